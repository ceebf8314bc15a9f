"""The Kubeflow pipeline: the same stage functions as `dvc.yaml`, chained with typed artifacts.

    jointdistill pipeline compile -o jointdistill.yaml [--image IMAGE]
    jointdistill pipeline run-local            # kfp.local, SubprocessRunner, this environment

The pipeline takes one parameter, ``params``: the whole params.yaml as a struct, validated by the same
pydantic models when each step starts; the compiled file carries params.yaml's values as its default.
"""


from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl

from .. import __version__
from ..components import distill as distill_component
from ..components import evaluate as evaluate_component
from ..components import export as export_component
from ..components import prepare as prepare_component
from ..components import teacher as teacher_component
from ..config import Params

PIPELINE_NAME = "jointdistill"
# The project image (one for every step; see the Dockerfile). Its kfp is the version pinned in pyproject.
DEFAULT_IMAGE = f"jointdistill:{__version__}"


class PipelineOutputs(NamedTuple):
    prepared: dsl.Dataset
    teacher_seg: dsl.Model
    teacher_depth: dsl.Model
    student: dsl.Model
    evaluation: dsl.Dataset
    onnx_model: dsl.Model


def pipeline_params(params: Params) -> dict:
    """Params as a KFP struct value. Protobuf structs have no null: unset optional keys are left out, and
    validation on the other side restores them as their defaults (None)."""
    return params.model_dump(mode="json", exclude_none=True)


def build(params: Params, image: str = DEFAULT_IMAGE):
    """Return the @dsl.pipeline function, with ``params`` as the default of its ``params`` input."""
    prepare_op = prepare_component.component(image)
    teacher_op = teacher_component.component(image)
    distill_op = distill_component.component(image)
    evaluate_op = evaluate_component.component(image)
    export_op = export_component.component(image)
    defaults = pipeline_params(params)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="JointDistill: prepare → teachers → distill → evaluate → export",
    )
    def jointdistill(params: dict = defaults) -> PipelineOutputs:
        prepare = prepare_op(params=params).set_display_name("prepare")
        # Deterministic for a given params value: safe to reuse a cached result.
        prepare.set_caching_options(enable_caching=True)
        teachers = {}
        for task in ("seg", "depth"):  # independent: they run in parallel
            t = teacher_op(params=params, task=task, prepared=prepare.outputs["prepared"])
            t.set_display_name(f"train-teacher-{task}").set_caching_options(enable_caching=True)
            teachers[task] = t
        student = distill_op(params=params, prepared=prepare.outputs["prepared"],
                             teacher_seg=teachers["seg"].outputs["teacher"],
                             teacher_depth=teachers["depth"].outputs["teacher"])
        student.set_display_name("distill").set_caching_options(enable_caching=True)
        evaluation = evaluate_op(params=params, prepared=prepare.outputs["prepared"],
                                 teacher_seg=teachers["seg"].outputs["teacher"],
                                 teacher_depth=teachers["depth"].outputs["teacher"],
                                 student=student.outputs["student"])
        evaluation.set_display_name("evaluate").set_caching_options(enable_caching=True)
        # After evaluate, so a model is only exported once its evaluation has run.
        exported = export_op(params=params, prepared=prepare.outputs["prepared"],
                             student=student.outputs["student"]).after(evaluation)
        exported.set_display_name("export").set_caching_options(enable_caching=True)
        return PipelineOutputs(prepare.outputs["prepared"], teachers["seg"].outputs["teacher"],
                               teachers["depth"].outputs["teacher"], student.outputs["student"],
                               evaluation.outputs["evaluation"], exported.outputs["onnx_model"])

    return jointdistill


def compile_pipeline(output: str | Path, params: Params, image: str | None = None) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build(params, image or DEFAULT_IMAGE), package_path=str(output))
    return output


def run_local(params: Params, root: str | Path, enable_caching: bool = False) -> dict[str, str]:
    """Execute the pipeline with kfp.local in this Python environment; return output artifact paths."""
    from kfp import local

    root = Path(root).absolute()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        enable_caching=enable_caching,
    )
    pipeline = build(params)
    task = pipeline(params=pipeline_params(params))
    return {name: artifact.path for name, artifact in task.outputs.items()}


__all__ = ["build", "compile_pipeline", "run_local", "pipeline_params", "DEFAULT_IMAGE", "PIPELINE_NAME"]
