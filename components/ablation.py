"""KFP components of the ablation pipeline: adapters over the same functions `jointdistill ablate` runs in-process
(jointdistill.ablation and the stages).

A seed travels inside its prepared data's metadata, not as a parameter: the steps of the inner ParallelFor (over
variants) read it from there (KFP metadata numbers are floats: int()), so no step needs the outer loop's item.
Each function is a component's whole source: it imports what it uses inside.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def prepare(params: dict, seed: int, prepared: Output[Dataset]):
    """The seed's prepared data: the seed draws val and the budget's labelled frames (the test split is fixed)."""
    from jointdistill.ablation import with_changes
    from jointdistill.config import params_from_dict
    from jointdistill.stages import prepare as stage
    from jointdistill.stages.results import record_artifact

    cfg = with_changes(params_from_dict(params, "pipeline parameter 'params'"), seed=seed)
    record_artifact(prepared, stage.run(cfg, prepared.path))
    prepared.metadata["seed"] = seed


def train_teacher(params: dict, task: str, prepared: Input[Dataset], teacher: Output[Model], metrics: Output[Metrics]):
    """The seed's `task` teacher, trained on its prepared data."""
    from jointdistill.ablation import with_changes
    from jointdistill.config import params_from_dict
    from jointdistill.stages import teacher as stage
    from jointdistill.stages.results import record_artifact

    seed = int(prepared.metadata["seed"])
    cfg = with_changes(params_from_dict(params, "pipeline parameter 'params'"), seed=seed)
    record_artifact(teacher, stage.run(cfg, task, prepared.path, teacher.path), metrics)


def distill(
    params: dict,
    variant: dict,
    prepared: Input[Dataset],
    teacher_seg: Input[Model],
    teacher_depth: Input[Model],
    student: Output[Model],
    metrics: Output[Metrics],
):
    """One variant's student for the seed of ``prepared``."""
    from jointdistill import ablation
    from jointdistill.config import params_from_dict
    from jointdistill.distill.plan import uses_teachers
    from jointdistill.stages import distill as stage
    from jointdistill.stages.results import record_artifact

    v = ablation.Variant(**variant)
    seed = int(prepared.metadata["seed"])
    cfg = ablation.variant_params(params_from_dict(params, "pipeline parameter 'params'"), seed, v)
    teachers = (teacher_seg.path, teacher_depth.path) if uses_teachers(cfg.distill.mode) else None
    record_artifact(student, stage.run(cfg, prepared.path, teachers, student.path), metrics)
    student.metadata["variant"] = v.name


def evaluate(
    params: dict,
    variant: dict,
    prepared: Input[Dataset],
    teacher_seg: Input[Model],
    teacher_depth: Input[Model],
    student: Input[Model],
    row: Output[Artifact],
    metrics: Output[Metrics],
):
    """The student's row of the table: test metrics and Δm against the seed's teachers (what `ablate` scores)."""
    import json

    from jointdistill import ablation
    from jointdistill.config import params_from_dict

    seed = int(prepared.metadata["seed"])
    reference = ablation.reference_metrics(teacher_seg.path, teacher_depth.path)
    cfg = params_from_dict(params, "pipeline parameter 'params'")
    result = ablation.score_student(cfg, seed, variant["name"], prepared.path, student.path, reference)
    with open(row.path, "w") as f:
        json.dump(result, f)
    for key in ablation.COLUMNS:
        metrics.log_metric(key, result[key])


def seed_rows(
    teachers: bool,
    prepared: Input[Dataset],
    teacher_seg: Input[Model],
    teacher_depth: Input[Model],
    rows: Input[list[Artifact]],
    table: Output[Artifact],
):
    """One seed's rows (the teachers' own row first when asked for, then the students') and the count of frames
    the KD modes learn from without a label (the gate's caveat)."""
    import json

    from jointdistill import ablation

    seed = int(prepared.metadata["seed"])
    out = [json.load(open(r.path)) for r in rows]
    if teachers:
        reference = ablation.reference_metrics(teacher_seg.path, teacher_depth.path)
        out.insert(0, ablation.teachers_row(seed, ablation.TEACHERS_ROW, reference))
    with open(table.path, "w") as f:
        json.dump({"seed": seed, "rows": out, "pool": ablation.pool_size(prepared.path)}, f)


def aggregate(
    params: dict,
    seeds: list,
    variants: list,
    teachers: bool,
    reference: str,
    seed_rows: Input[list[Artifact]],
    ablation: Output[Dataset],
    view: Output[Markdown],
    paired: Output[Metrics],
):
    """What `ablate` writes (ablation.md/csv/json/png, paired.png, runs.csv) from every seed's rows, with the
    Markdown table as the run page's view and each pair's mean Δm difference as a metric."""
    import json
    import os
    import shutil
    from pathlib import Path

    from jointdistill import ablation as stage
    from jointdistill.config import params_from_dict

    cfg = params_from_dict(params, "pipeline parameter 'params'")
    seeds = [int(s) for s in seeds]  # a list parameter's ints arrive as floats
    names = ([stage.TEACHERS_ROW] if teachers else []) + [v["name"] for v in variants]
    parts = sorted((json.load(open(a.path)) for a in seed_rows), key=lambda p: seeds.index(int(p["seed"])))
    results = [row for p in parts for row in sorted(p["rows"], key=lambda r: names.index(r["mode"]))]
    kd_pool = int(parts[0]["pool"]) if cfg.distill.unlabelled_batch else 0
    stage.aggregate(Path(ablation.path), results, names, seeds, kd_pool, reference or None)
    shutil.copyfile(os.path.join(ablation.path, "ablation.md"), view.path)
    for p in json.load(open(os.path.join(ablation.path, "ablation.json")))["pairs"]:
        paired.log_metric(f"delta_m/{p['a']} - {p['b']}", p["delta_m"]["mean"])


def components(image: str) -> dict:
    """Every step, bound to ``image``; nothing is pip-installed at run time."""
    steps = (prepare, train_teacher, distill, evaluate, seed_rows, aggregate)
    return {f.__name__: dsl.component(f, base_image=image, install_kfp_package=False) for f in steps}
