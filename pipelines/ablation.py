"""The ablation as a Kubeflow pipeline, ``jointdistill-ablation``: what `jointdistill ablate` runs in one process,
fanned out over the cluster.

    jointdistill pipeline compile --ablation [--modes … | --vary KEY=V1,V2 [--one-at-a-time]] [--seeds 0,1,2]
    jointdistill pipeline run-local --ablation …   # kfp.local, this environment

Steps: ParallelFor over seeds (the seed's prepared data, then both teachers) → inside it, ParallelFor over the
variants (a mode such as ``full+deficit``, or a grid point: distill → evaluate) → the seed's rows (Collected) →
one aggregate step over every seed's rows (Collected), which calls the same `jointdistill.ablation.aggregate` as
`ablate` and writes the same files, as a Dataset artifact, with the Markdown table as the run's view.

Run parameters: ``params`` (params.yaml as a struct), ``seeds`` and ``variants`` (the rows, as compiled; a
variant is {name, changes, student}). Each step's resources, caching and retries come from ``params.pipeline``
(prepare, teacher, distill, evaluate), as in the main pipeline; training always runs in the step's own pod here
(``pipeline.trainjob`` is not used). A variant that changes what the prepared data or the teachers depend on
(e.g. ``--vary prepare.val_fraction=…``) needs its own per seed: `ablate` runs those, this pipeline refuses them.
"""

from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

from jointdistill.components import ablation as steps
from jointdistill.pipelines.pipeline import DEFAULT_IMAGE, configure, pipeline_params
from kfp import compiler, dsl

from jointdistill import ablation
from jointdistill.config import Params, StepResources
from jointdistill.errors import ConfigError

PIPELINE_NAME = "jointdistill-ablation"
COMPILED = "jointdistill-ablation.yaml"
_SMALL = StepResources(cpu="1", memory="2G", cache=False)  # reading rows and writing a table


class AblationOutputs(NamedTuple):
    ablation: dsl.Dataset  # ablation.md/csv/json/png, paired.png, runs.csv: what `ablate` writes
    view: dsl.Markdown  # the table, shown on the run page
    paired: dsl.Metrics  # each pair's mean Δm difference


def build(
    params: Params,
    modes=None,
    vary: dict[str, list] | None = None,
    seeds=ablation.SEEDS,
    image: str = DEFAULT_IMAGE,
    each: bool = False,
):
    """Return the @dsl.pipeline function for these rows (``modes``, default `ablate`'s, or a ``vary`` grid, one key
    at a time with ``each``)."""
    variants, reference = ablation.plan(params, modes or ablation.MODES, vary, each)
    own = ablation.own_data_or_teachers(params, variants)
    if own:
        raise ConfigError(
            f"the ablation pipeline shares one prepared dataset and one pair of teachers per seed; {own} change "
            "what those depend on: run them with `jointdistill ablate`"
        )
    students = [asdict(v) for v in variants if v.student]
    if not students:
        raise ConfigError("the ablation pipeline needs at least one student row (a mode other than single)")
    teachers_row = any(not v.student for v in variants)
    ops = steps.components(image)
    res, cfg = params.pipeline, params
    defaults, seed_list = pipeline_params(params), list(seeds)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="JointDistill ablation: per seed prepare → teachers → per variant distill → evaluate; "
        "one aggregate table with paired intervals",
    )
    def jointdistill_ablation(
        params: dict = defaults, seeds: list = seed_list, variants: list = students
    ) -> AblationOutputs:
        with dsl.ParallelFor(seeds, name="seeds") as seed:
            prepared = configure(ops["prepare"](params=params, seed=seed), res.prepare, cfg, "prepare").outputs[
                "prepared"
            ]
            teacher = {}
            for task in ("seg", "depth"):  # independent: they run in parallel
                t = ops["train_teacher"](params=params, task=task, prepared=prepared)
                teacher[task] = configure(t, res.teacher, cfg, f"train-teacher-{task}", training=True).outputs[
                    "teacher"
                ]
            with dsl.ParallelFor(variants, name="variants") as variant:
                run = {
                    "params": params,
                    "variant": variant,
                    "prepared": prepared,
                    "teacher_seg": teacher["seg"],
                    "teacher_depth": teacher["depth"],
                }
                student = configure(ops["distill"](**run), res.distill, cfg, "distill", training=True)
                scored = ops["evaluate"](**run, student=student.outputs["student"])
                configure(scored, res.evaluate, cfg, "evaluate")
            # Gathered per seed, then over seeds: one Collected per loop level.
            rows = ops["seed_rows"](
                teachers=teachers_row,
                prepared=prepared,
                teacher_seg=teacher["seg"],
                teacher_depth=teacher["depth"],
                rows=dsl.Collected(scored.outputs["row"]),
            )
            configure(rows, _SMALL, cfg, "seed-rows")
        table = ops["aggregate"](
            params=params,
            seeds=seeds,
            variants=variants,
            teachers=teachers_row,
            reference=reference or "",
            seed_rows=dsl.Collected(rows.outputs["table"]),
        )
        configure(table, _SMALL, cfg, "aggregate")
        return AblationOutputs(table.outputs["ablation"], table.outputs["view"], table.outputs["paired"])

    return jointdistill_ablation


def compile_pipeline(output: str | Path, params: Params, image: str | None = None, **rows) -> Path:
    """Compile to ``output``; ``rows``: `build`'s modes, vary, each and seeds."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build(params, image=image or DEFAULT_IMAGE, **rows), package_path=str(output))
    return output


def run_local(params: Params, root: str | Path, enable_caching: bool = False, **rows) -> dict:
    """Execute it with kfp.local in this Python environment; return the output artifacts (path, uri, metadata)."""
    from kfp import local

    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(Path(root).absolute()),
        enable_caching=enable_caching,
    )
    task = build(params, **rows)(params=pipeline_params(params))
    return dict(task.outputs)


__all__ = ["build", "compile_pipeline", "run_local", "PIPELINE_NAME", "COMPILED"]
