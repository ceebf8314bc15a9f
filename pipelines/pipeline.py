"""The Kubeflow pipeline: the same stage functions as `dvc.yaml`, chained with typed artifacts.

    jointdistill pipeline compile -o jointdistill.yaml [--image IMAGE]
    jointdistill pipeline run-local            # kfp.local, SubprocessRunner, this environment

Its main parameter, ``params``, is the whole params.yaml as a struct, validated by the same pydantic models
when each step starts; the compiled file carries params.yaml's values as its default. String run parameters,
empty by default, pin the data to a DVC project's version (``data_repo``, ``data_rev``, ``data_path``) and
turn on the last step that pushes the outputs back into DVC (``results_remote``, ``results_prefix``,
``results_git_repo``, ``results_git_branch``).
"""

import functools
from pathlib import Path
from typing import NamedTuple

from jointdistill.components import distill as distill_component
from jointdistill.components import evaluate as evaluate_component
from jointdistill.components import export as export_component
from jointdistill.components import prepare as prepare_component
from jointdistill.components import results as results_component
from jointdistill.components import source as source_component
from jointdistill.components import teacher as teacher_component
from kfp import compiler, dsl

from jointdistill import __version__
from jointdistill.config import Params, StepResources

PIPELINE_NAME = "jointdistill"
# The project image (one for every step; see the Dockerfile). Its kfp is the version pinned in pyproject.
DEFAULT_IMAGE = f"jointdistill:{__version__}"


# A training step that only launches a Kubeflow Trainer job and waits for it is small,
# no training placement (the job's nodes get that).
def _launcher(step: StepResources) -> StepResources:
    return StepResources(cpu="1", memory="2G", cache=step.cache)


class PipelineOutputs(NamedTuple):
    prepared: dsl.Dataset
    teacher_seg: dsl.Model
    teacher_depth: dsl.Model
    student: dsl.Model
    evaluation: dsl.Dataset
    onnx_model: dsl.Model
    confusion: dsl.ClassificationMetrics  # the student's test confusion matrix, with class names
    class_iou: dsl.Metrics  # the student's test IoU per class


def pipeline_params(params: Params) -> dict:
    """Params as a KFP struct value. Protobuf structs have no null: unset optional keys are left out, and
    validation on the other side restores them as their defaults (None)."""
    return params.model_dump(mode="json", exclude_none=True)


def configure(task, step: StepResources, params: Params, display_name: str, training: bool = False):
    """Resources, caching, retries and (for training steps) placement of one task, from ``params.pipeline``."""
    task.set_display_name(display_name).set_caching_options(enable_caching=step.cache)
    if step.cpu:
        task.set_cpu_request(step.cpu).set_cpu_limit(step.cpu)
    if step.memory:
        task.set_memory_request(step.memory).set_memory_limit(step.memory)
    if step.accelerator_limit:
        task.set_accelerator_type(step.accelerator_type).set_accelerator_limit(step.accelerator_limit)
    cfg = params.pipeline
    if cfg.retries:
        task.set_retry(cfg.retries, backoff_duration=cfg.retry_backoff, backoff_factor=2.0)
    if training and (cfg.node_selector or cfg.tolerations):
        from kfp import kubernetes

        for key, value in cfg.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for t in cfg.tolerations:
            kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
    return task


def build(params: Params, image: str = DEFAULT_IMAGE):
    """Return the @dsl.pipeline function, with ``params`` as the default of its ``params`` input."""
    source_op = source_component.component(image)
    prepare_op = prepare_component.component(image)
    jobs = params.pipeline.trainjob.enabled
    if jobs:  # the training steps launch Kubeflow Trainer jobs of the same image and wait for them
        teacher_op = functools.partial(teacher_component.job_component(image), image=image)
        distill_op = functools.partial(distill_component.job_component(image), image=image)
    else:
        teacher_op = teacher_component.component(image)
        distill_op = distill_component.component(image)
    evaluate_op = evaluate_component.component(image)
    export_op = export_component.component(image)
    results_op = results_component.component(image)
    defaults = pipeline_params(params)
    res, cfg = params.pipeline, params

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="JointDistill: data source → prepare → teachers → distill → evaluate → export [→ DVC]",
    )
    def jointdistill(
        params: dict = defaults,
        data_repo: str = "",
        data_rev: str = "",
        data_path: str = "",
        results_remote: str = "",
        results_prefix: str = "",
        results_git_repo: str = "",
        results_git_branch: str = "",
    ) -> PipelineOutputs:
        # The data: a version of a DVC project (git URL or path, revision, DVC-tracked path), or with data_repo
        # empty the embedded synthetic generator. A bad pin fails in this first step.
        # A pinned revision may be a branch that moves: never reuse a cached fetch.
        src = configure(
            source_op(repo=data_repo, rev=data_rev, path=data_path),
            StepResources(cpu="1", memory="2G", cache=False),
            cfg,
            "data-source",
        )
        # Deterministic for a given params value: prepare and the teachers reuse cached results by default.
        prepare = configure(prepare_op(params=params, source=src.outputs["data"]), res.prepare, cfg, "prepare")
        teachers = {}
        for task in ("seg", "depth"):  # independent: they run in parallel
            t = teacher_op(params=params, task=task, prepared=prepare.outputs["prepared"])
            teachers[task] = configure(
                t, _launcher(res.teacher) if jobs else res.teacher, cfg, f"train-teacher-{task}", training=not jobs
            )
        student = distill_op(
            params=params,
            prepared=prepare.outputs["prepared"],
            teacher_seg=teachers["seg"].outputs["teacher"],
            teacher_depth=teachers["depth"].outputs["teacher"],
        )
        configure(student, _launcher(res.distill) if jobs else res.distill, cfg, "distill", training=not jobs)
        evaluation = evaluate_op(
            params=params,
            prepared=prepare.outputs["prepared"],
            teacher_seg=teachers["seg"].outputs["teacher"],
            teacher_depth=teachers["depth"].outputs["teacher"],
            student=student.outputs["student"],
        )
        configure(evaluation, res.evaluate, cfg, "evaluate")
        # After evaluate, so a model is only exported once its evaluation has run.
        exported = export_op(
            params=params, prepared=prepare.outputs["prepared"], student=student.outputs["student"]
        ).after(evaluation)
        configure(exported, res.export, cfg, "export")
        # Optional: the run's outputs back into DVC (pushed to the project's remote, .dvc pointers written).
        with dsl.If(results_remote != "", name="results-to-dvc"):
            pushed = results_op(
                params=params,
                prepared=prepare.outputs["prepared"],
                teacher_seg=teachers["seg"].outputs["teacher"],
                teacher_depth=teachers["depth"].outputs["teacher"],
                student=student.outputs["student"],
                evaluation=evaluation.outputs["evaluation"],
                onnx_model=exported.outputs["onnx_model"],
                remote=results_remote,
                prefix=results_prefix,
                git_repo=results_git_repo,
                git_branch=results_git_branch,
                run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
            )
            configure(pushed, StepResources(cpu="1", memory="4G", cache=False), cfg, "push-results")
        return PipelineOutputs(
            prepare.outputs["prepared"],
            teachers["seg"].outputs["teacher"],
            teachers["depth"].outputs["teacher"],
            student.outputs["student"],
            evaluation.outputs["evaluation"],
            exported.outputs["onnx_model"],
            evaluation.outputs["confusion"],
            evaluation.outputs["class_iou"],
        )

    return jointdistill


def compile_pipeline(output: str | Path, params: Params, image: str | None = None) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build(params, image or DEFAULT_IMAGE), package_path=str(output))
    return output


def submit(
    params: Params,
    host: str | None,
    experiment: str = "jointdistill",
    run_name: str | None = None,
    image: str | None = None,
    enable_caching: bool | None = None,
    token: str | None = None,
    arguments: dict[str, str] | None = None,
) -> dict:
    """Compile and start a run on a Kubeflow Pipelines API server (kfp.Client); return its id and URL.

    ``enable_caching`` None keeps each step's own setting (``pipeline.<step>.cache``); True/False overrides all
    steps for this run. The bearer token, if any, comes from ``token`` (the CLI reads $KFP_TOKEN)."""
    import tempfile

    import kfp

    run_name = run_name or f"{PIPELINE_NAME}-{params.digest()[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(Path(tmp) / "jointdistill.yaml", params, image)
        client = kfp.Client(host=host, existing_token=token)
        run = client.create_run_from_pipeline_package(
            str(package),
            arguments={"params": pipeline_params(params), **{k: v for k, v in (arguments or {}).items() if v}},
            run_name=run_name,
            experiment_name=experiment,
            enable_caching=enable_caching,
        )
    base = (host or "").rstrip("/")
    return {
        "run_id": run.run_id,
        "run_name": run_name,
        "experiment": experiment,
        "url": f"{base}/#/runs/details/{run.run_id}",
    }


def run_local(params: Params, root: str | Path, enable_caching: bool = False, **arguments: str) -> dict[str, str]:
    """Execute the pipeline with kfp.local in this Python environment; return output artifact paths.
    ``arguments``: the pipeline's string parameters (data_repo, data_rev, data_path, results_remote, …)."""
    return {
        name: artifact.path for name, artifact in run_local_artifacts(params, root, enable_caching, **arguments).items()
    }


def run_local_artifacts(params: Params, root: str | Path, enable_caching: bool = False, **arguments: str) -> dict:
    """As `run_local`, returning the output artifacts themselves (path, uri and metadata)."""
    from kfp import local

    root = Path(root).absolute()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        enable_caching=enable_caching,
    )
    pipeline = build(params)
    task = pipeline(params=pipeline_params(params), **arguments)
    return dict(task.outputs)


__all__ = [
    "build",
    "compile_pipeline",
    "submit",
    "run_local",
    "run_local_artifacts",
    "pipeline_params",
    "DEFAULT_IMAGE",
    "PIPELINE_NAME",
]
