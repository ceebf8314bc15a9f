"""The `jointdistill` command line: a thin adapter that parses options, loads params and calls a stage."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, cast

import typer
import typer.core

from jointdistill import __version__
from jointdistill.errors import ConfigError, JointDistillError, brief

app = typer.Typer(
    name="jointdistill",
    help="Distil a multi-task student (segmentation + depth) from two single-task teachers (JointDistill).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
pipeline_app = typer.Typer(help="Compile or run the Kubeflow pipeline.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")

ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="params file (YAML); every knob of every stage lives here")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override one params key, e.g. --set prepare.height=96 (repeatable)"),
]

DataOpt = Annotated[Path, typer.Option("--data", "-d", help="prepared data folder (output of prepare)")]
TeachersOpt = Annotated[
    tuple[Path, Path],
    typer.Option(
        help="the seg teacher's folder, then the depth teacher's (outputs of train-teacher); "
        "distill in mode mtl does not read them"
    ),
]
TEACHERS = (Path("data/teachers/seg"), Path("data/teachers/depth"))
# The training commands also take gs:// URLs (what a Kubeflow Trainer job passes them; see staging.py): plain
# strings, since a Path would fold "gs://" into "gs:/".
_GS = "; or gs://BUCKET/PATH"
StagedParamsOpt = Annotated[str, typer.Option("--params", "-p", help="params file (YAML)" + _GS)]
StagedDataOpt = Annotated[str, typer.Option("--data", "-d", help="prepared data folder (output of prepare)" + _GS)]
StagedTeachersOpt = Annotated[
    tuple[str, str],
    typer.Option(
        help="the seg teacher's folder, then the depth teacher's (outputs of train-teacher); "
        "distill in mode mtl does not read them" + _GS
    ),
]
CheckpointsOpt = Annotated[
    Path | None,
    typer.Option(help="folder for the resumable checkpoint and live logs (default: OUT's hidden sibling)"),
]
MetricsOpt = Annotated[
    Path | None,
    typer.Option(
        "--metrics",
        help="folder for metrics.json (the numbers DVC and Kubeflow show), run.json (times, "
        "machine) and training curves; keeps OUT free of run-dependent files (default: OUT)",
    ),
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="continue from the last checkpoint if it was made with these params")
]


def _unwrap(doc: str | None) -> str | None:
    """A docstring as help text: each paragraph on one line (the terminal wraps it at its own width, where the
    source's line breaks would cut sentences mid-phrase), paragraphs apart."""
    if not doc:
        return doc
    text = inspect.cleandoc(doc)
    return "\n\n".join(" ".join(line.strip() for line in para.splitlines()) for para in text.split("\n\n"))


def _friendly(fn):
    """Errors a user can cause become one line on stderr and exit status 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except JointDistillError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    wrapper.__doc__ = _unwrap(fn.__doc__)
    return wrapper


def _plain_metavar(display_type_rich):
    """Typer shows each option's Python type (``<bool>``, ``<list[str]>``); users read a value's kind (TEXT, PATH,
    INTEGER), and a flag takes no value at all."""
    names = {"str": "TEXT", "path": "PATH", "int": "INTEGER", "float": "NUMBER"}

    def show(self, ctx):
        shown = display_type_rich(self, ctx)
        if shown is None or not shown.startswith("<"):
            return shown  # a metavar we set, or choices (seg|depth)
        inner, dots = shown.removesuffix("...")[1:].rstrip(">"), shown.endswith("...")
        if inner == "bool":
            return None
        if "|" in inner:
            return inner + ("..." if dots else "")  # choices, as they are typed
        inner = inner.removeprefix("list[").removesuffix("]")
        return " ".join(names.get(part, part.upper()) for part in inner.split(",")) + ("..." if dots else "")

    return show


# Typer has no hook for this: its two parameter classes get the method replaced (the one patch in this package).
typer.core.TyperOption.display_type_rich = _plain_metavar(typer.core.TyperOption.display_type_rich)  # type: ignore[method-assign]
typer.core.TyperArgument.display_type_rich = _plain_metavar(typer.core.TyperArgument.display_type_rich)  # type: ignore[method-assign]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="print the version and exit", callback=_print_version, is_eager=True)
    ] = False,
) -> None:
    _setup_logging(verbose)


def _params_epilog(section: str) -> str:
    """The params a stage reads, with their defaults and meaning, from the pydantic models."""
    from pydantic import BaseModel

    from jointdistill.config import Params

    model = cast(type[BaseModel], Params.model_fields[section].annotation)
    lines = [f"Params ({section}.*, set in params.yaml or with --set):"]
    for name, field in model.model_fields.items():
        lines.append(f"  {section}.{name} = {field.default!r}: {field.description or ''}")
    # Typer's rich help joins lines of one paragraph; a blank line between entries keeps them apart.
    return "\n\n".join(lines)


@app.command(epilog=_params_epilog("prepare"))
@_friendly
def prepare(
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder (replaced atomically)")] = Path(
        "data/prepared"
    ),
    metrics: MetricsOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Build the prepared dataset from the source named by prepare.dataset.

    Writes OUT/meta.json, OUT/manifest.parquet, OUT/gallery.png, OUT/checksums.json (every file's sha256, checked
    by every later stage) and OUT/{train,val,test}/{images,labels,depth}.npy; METRICS/metrics.json and
    METRICS/run.json.
    and OUT/unlabelled/images.npy for frames with no label. A real source keeps every label it has; the synthetic
    benchmark draws its label budget (prepare.budget, per task) by the seed. The val split is a deterministic
    prepare.val_fraction of the labelled frames (seeded hash of the sample id); the source's own test split becomes
    test. Params read: seed, prepare.*.
    """
    from jointdistill.config import load_params
    from jointdistill.stages import prepare as stage

    cfg = load_params(params, set_)
    result = stage.run(cfg, out, metrics_dir=metrics)
    typer.echo(f"prepared → {out}  ({result.headline()}; gallery: {out / 'gallery.png'})")


class TeacherTask(StrEnum):
    seg = "seg"
    depth = "depth"


@app.command("train-teacher", epilog=_params_epilog("teacher"))
@_friendly
def train_teacher(
    task: Annotated[TeacherTask, typer.Option("--task", "-t", help="which teacher: seg or depth")],
    data: StagedDataOpt = "data/prepared",
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="output folder (default: data/teachers/TASK)" + _GS)
    ] = None,
    checkpoints: CheckpointsOpt = None,
    resume: ResumeOpt = False,
    metrics: MetricsOpt = None,
    params: StagedParamsOpt = "params.yaml",
    set_: SetOpt = None,
) -> None:
    """Train one single-task teacher; keep the best epoch on val; report val and test metrics.

    Writes OUT/model.pt (weights + model config), OUT/report.json (val, test, trivial baselines) and
    OUT/lineage.json; METRICS/metrics.json, METRICS/run.json and METRICS/dvclive/.
    Under torchrun (--nproc_per_node N) it trains with DDP (gloo on CPU, nccl on GPU).
    Params read: seed, augment.*, teacher.* (teacher.seg.* / teacher.depth.* override for one task).
    """
    from jointdistill.cloud.staging import staging
    from jointdistill.config import load_params
    from jointdistill.stages import teacher as stage

    out = out or f"data/teachers/{task.value}"
    with staging() as paths:
        cfg = load_params(paths.input(params), set_)
        result = stage.run(cfg, task.value, paths.input(data), paths.output(out), checkpoints, resume, metrics)
    typer.echo(f"teacher {task.value} → {out}  ({result.headline()})")


@app.command("distill", epilog=_params_epilog("distill"))
@_friendly
def distill(
    data: StagedDataOpt = "data/prepared",
    teachers: StagedTeachersOpt = (str(TEACHERS[0]), str(TEACHERS[1])),
    out: Annotated[str, typer.Option("--out", "-o", help="output folder (replaced atomically)" + _GS)] = "data/student",
    checkpoints: CheckpointsOpt = None,
    resume: ResumeOpt = False,
    teacher_cache: Annotated[
        Path | None,
        typer.Option(
            help="with distill.teacher_cache: the cache folder, reused when it matches the teachers and "
            "data (default: CHECKPOINTS/teacher_cache)"
        ),
    ] = None,
    metrics: MetricsOpt = None,
    params: StagedParamsOpt = "params.yaml",
    set_: SetOpt = None,
) -> None:
    """Train the multi-task student, on its labels alone or from the two frozen teachers (distill.mode).

    Modes: mtl (task losses only, no teachers; the default), self_train (+ the student's own earlier predictions on
    the raw frames), static_kd (+ distillation, ω = 1), adaptive (+ feedback-driven teacher weights ω), full
    (+ knowledge trajectory: JointDistill). Validates every epoch (a timeframe), where
    ω is updated and the trajectories are recorded. Writes OUT/student.pt, OUT/report.json, OUT/weights.csv
    (timeframe, step, task, feedback, omega), OUT/trajectory.parquet (timeframe, step, image, rank, y, x, value,
    source) and OUT/lineage.json; METRICS/metrics.json, METRICS/run.json and METRICS/dvclive/.
    Under torchrun (--nproc_per_node N) it trains with DDP. With
    distill.teacher_cache the teachers run once over train/val and training reads their cached features.
    Params read: seed, augment.*, student.*, distill.*.
    """
    from jointdistill.cloud.staging import staging
    from jointdistill.config import load_params
    from jointdistill.distill.plan import uses_teachers
    from jointdistill.stages import distill as stage

    with staging() as paths:
        cfg = load_params(paths.input(params), set_)
        teacher_dirs = (paths.input(teachers[0]), paths.input(teachers[1])) if uses_teachers(cfg.distill.mode) else None
        result = stage.run(
            cfg, paths.input(data), teacher_dirs, paths.output(out), checkpoints, resume, teacher_cache, metrics
        )
    typer.echo(f"student → {out}  ({result.headline()})")


@app.command("evaluate", epilog=_params_epilog("evaluate"))
@_friendly
def evaluate(
    data: DataOpt = Path("data/prepared"),
    teachers: TeachersOpt = TEACHERS,
    student: Annotated[Path, typer.Option(help="the student's folder (output of distill)")] = Path("data/student"),
    mtl: Annotated[
        Path | None, typer.Option(help="optional MTL baseline (a distill output with distill.mode=mtl)")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder (replaced atomically)")] = Path("data/eval"),
    metrics: MetricsOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Compare the student with the teachers (and an MTL baseline) on test: exact metrics, Δm, pictures, report.

    Writes OUT/report.json ({model: {split: metrics}}, Δm in the student's), OUT/report.md, OUT/report.html
    (self-contained), OUT/plots/ (CSV for `dvc plots show`, PNG figures), METRICS/metrics.json and
    METRICS/run.json. Params read: evaluate.*.
    """
    from jointdistill.config import load_params
    from jointdistill.stages import evaluate as stage

    cfg = load_params(params, set_)
    result = stage.run(cfg, data, teachers, student, out, mtl, metrics)
    typer.echo(f"evaluation → {out}  ({result.headline()}; report: {out / 'report.html'})")


@app.command("export", epilog=_params_epilog("export"))
@_friendly
def export(
    data: DataOpt = Path("data/prepared"),
    student: Annotated[Path, typer.Option(help="the student's folder (output of distill)")] = Path("data/student"),
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder (replaced atomically)")] = Path("data/export"),
    metrics: MetricsOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Export the student to ONNX and prove onnxruntime computes what PyTorch does.

    Writes OUT/student.onnx (input `image` N×3×H×W normalised, outputs `segmentation_logits` and `depth` in
    metres; batch, height and width dynamic; metadata_props as JSON), OUT/parity.json, OUT/report.json
    (test metrics per file), OUT/MODEL_CARD.md and METRICS/metrics.json, METRICS/run.json (latency);
    with export.fp16 / export.int8 also
    student.fp16.onnx / student.int8.onnx. If onnxruntime's outputs break the tolerance the stage fails and
    leaves OUT as it was. Params read: seed, export.*.
    """
    from jointdistill.config import load_params
    from jointdistill.stages import export as stage

    cfg = load_params(params, set_)
    result = stage.run(cfg, data, student, out, metrics)
    typer.echo(f"exported → {out / 'student.onnx'}  ({result.headline()}; card: {out / 'MODEL_CARD.md'})")


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@app.command("predict")
@_friendly
def predict(
    model: Annotated[Path, typer.Argument(help="an exported student (.onnx, from `jointdistill export`)")],
    images: Annotated[list[Path], typer.Argument(help="image files and/or folders of images")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the predictions")] = Path("predictions"),
    batch_size: Annotated[int, typer.Option(min=1, help="images per onnxruntime call")] = 8,
    device: Annotated[Device, typer.Option(help="auto: CUDA when onnxruntime-gpu sees a GPU, else CPU")] = (
        Device.auto
    ),
) -> None:
    """Segment and estimate depth for image files with the ONNX student (onnxruntime; no PyTorch needed).

    Writes per image OUT/NAME.labels.png (palette PNG of class ids), OUT/NAME.depth.png (16-bit, millimetres;
    0 = no depth) and OUT/NAME.depth_color.png. Images are resized to the model's input size and the
    predictions back to the image's size. An unreadable image is reported and the others are still
    written; the exit status is then 1.
    """
    from jointdistill.serving.infer import StudentSession, collect_images
    from jointdistill.serving.infer import predict as run_predict

    files = collect_images(images)
    if not files:
        raise typer.BadParameter("no image files found", param_hint="IMAGES")
    session = StudentSession(model, device.value)
    if session.fallback_reason:
        typer.echo(f"predict: running on the CPU ({session.fallback_reason})", err=True)
    with typer.progressbar(length=len(files), label="predict", file=sys.stderr) as bar:
        report = run_predict(session, files, out, batch_size, progress=bar.update)
    for _path, reason in report.failed:
        typer.echo(f"error: {reason}", err=True)
    typer.echo(f"predicted {len(report.written)} of {len(files)} images on {session.device_note} → {out}")
    if report.failed:
        raise typer.Exit(1)


class _ServeGroup(typer.core.TyperGroup):
    """`serve MODEL …` is `serve run MODEL …`; `serve manifest …` writes the cluster manifests."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().resolve_command(ctx, args)


serve_app = typer.Typer(
    cls=_ServeGroup,
    no_args_is_help=True,
    help="Serve the exported student (KServe, Open Inference Protocol v2): "
    "`serve MODEL.onnx|gs://…` runs the server, `serve manifest` writes InferenceServices.",
)
app.add_typer(serve_app, name="serve")


@serve_app.command("run")
@_friendly
def serve_run(
    model: Annotated[str, typer.Argument(help="student.onnx (or its export folder), or a published gs://…/VERSION")],
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0 in a container)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port")] = 8080,
    name: Annotated[str, typer.Option(help="model name in the /v2/models/<name> paths")] = "student",
    device: Annotated[Device, typer.Option(help="auto: CUDA when onnxruntime-gpu sees a GPU, else CPU")] = (
        Device.auto
    ),
    max_payload_mb: Annotated[float, typer.Option(min=0.001, help="larger request bodies get HTTP 400")] = 64.0,
    threads: Annotated[
        int | None, typer.Option(min=1, help="onnxruntime intra-op threads (default: all cores)")
    ] = None,
) -> None:
    """Serve the ONNX student over the Open Inference Protocol v2 (KServe model server) until stopped.

    POST /v2/models/NAME/infer with input `image` (FP32 N×3×H×W, normalised) or `image_bytes` (BYTES: PNG/JPEG,
    base64 in JSON); returns `segmentation` (INT32 N×H×W class ids) and `depth` (FP32 N×H×W metres).
    GET /v2/models/NAME gives the inputs, outputs and the model's metadata (classes, palette, size rules).
    The file is checked at start-up: anything that is not a jointdistill student is refused. No PyTorch needed.
    """
    from jointdistill.cloud import storage
    from jointdistill.serving.server import serve

    # A published gs:// model is fetched here, by the adapter: the server only ever loads a local file.
    local = storage.fetch_model_file(model) if storage.is_url(model) else model
    serve(local, host=host, port=port, name=name, device=device.value, max_payload_mb=max_payload_mb, threads=threads)


@serve_app.command("manifest")
@_friendly
def serve_manifest(
    storage_uri: Annotated[str, typer.Option(help="the published model: gs://BUCKET/PREFIX/VERSION")],
    image: Annotated[str | None, typer.Option(help="our image, for the jointdistill predictor")] = None,
    name: Annotated[str, typer.Option(help="InferenceService name (also the model name)")] = "jointdistill-student",
    namespace: Annotated[str | None, typer.Option(help="namespace (default: none in the YAML)")] = None,
    gpu: Annotated[bool, typer.Option(help="request one NVIDIA GPU per replica")] = False,
    cpu: Annotated[str, typer.Option(help="CPU request and limit per replica")] = "2",
    memory: Annotated[str, typer.Option(help="memory request and limit per replica")] = "4Gi",
    service_account: Annotated[str | None, typer.Option(help="service account with read access to the bucket")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the YAML files")] = Path("deploy"),
) -> None:
    """Write KServe InferenceService YAML for a published model: OUT/NAME.yaml (our predictor: our image, the
    `serve` command, readiness on the v2 path) and OUT/NAME-triton.yaml (KServe's Triton runtime on the
    Triton model repository `publish` lays out, no code of ours)."""
    from jointdistill.serving.deploy import write_manifests

    paths = write_manifests(
        out,
        storage_uri=storage_uri,
        image=image,
        name=name,
        namespace=namespace,
        gpu=gpu,
        cpu=cpu,
        memory=memory,
        service_account=service_account,
    )
    for path in paths:
        typer.echo(f"wrote {path}")


@app.command("publish")
@_friendly
def publish(
    url: Annotated[str, typer.Argument(help="gs://BUCKET or gs://BUCKET/PREFIX; the version goes below it")],
    export_dir: Annotated[Path, typer.Option("--export", help="the export folder (output of export)")] = Path(
        "data/export"
    ),
    version: Annotated[str | None, typer.Option(help="(default: <params digest>-<sha256 of student.onnx, 8 hex>)")] = (
        None
    ),
    triton: Annotated[
        bool,
        typer.Option(
            help="also lay out VERSION/triton/, a Triton model repository of the "
            "student (for `serve manifest`'s Triton InferenceService)"
        ),
    ] = True,
) -> None:
    """Upload an export (ONNX files, parity.json, MODEL_CARD.md, report.json) to gs://BUCKET/PREFIX/VERSION/.

    Each object is checked against the local file's md5 and crc32c after upload; manifest.json (sha256 of
    every file) is written last. A published version is never overwritten; an interrupted publish can be re-run.
    Credentials: Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS), or STORAGE_EMULATOR_HOST."""
    from jointdistill.cloud.storage import publish as run_publish

    manifest = run_publish(export_dir, url, version, triton=triton)
    typer.echo(f"published {len(manifest['files'])} files → {manifest['url']}")


@app.command("fetch-model")
@_friendly
def fetch_model(
    url: Annotated[str, typer.Argument(help="gs://BUCKET/PREFIX/VERSION (as printed by publish)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder to write (replaced atomically)")] = Path("model"),
) -> None:
    """Download a published model version and verify every file against its manifest (sha256, size)."""
    from jointdistill.cloud.storage import fetch_model as run_fetch

    manifest = run_fetch(url, out)
    typer.echo(f"fetched {manifest['version']} ({len(manifest['files'])} files, checksums verified) → {out}")


@app.command("fetch-data")
@_friendly
def fetch_data(
    repo: Annotated[str, typer.Argument(help="git URL or local path of a DVC project")],
    rev: Annotated[str, typer.Option(help="git revision: tag, branch or commit")],
    path: Annotated[str, typer.Option(help="DVC-tracked path in the project, e.g. data/raw/nyuv2")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder to write (replaced atomically)")],
    provenance: Annotated[Path | None, typer.Option(help="also write the provenance JSON here")] = None,
) -> None:
    """Fetch one version of a DVC-tracked dataset (DVC's API, from the project's remote) and check every file
    against the md5 the project records at that revision. Prints the provenance: repo, rev, commit, md5."""
    from jointdistill.cloud.pinned import fetch
    from jointdistill.io import write_json

    record = fetch(repo, rev, path, out)
    if provenance:
        write_json(provenance, record)
    typer.echo(json.dumps(record))


@app.command("push-results")
@_friendly
def push_results(
    remote: Annotated[str, typer.Option(help="DVC remote URL to push to (your project's, e.g. gs://bucket/dvc)")],
    output: Annotated[list[str], typer.Option(help="NAME=FOLDER, once per output (e.g. student=data/student)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the .dvc pointers (replaced atomically)")],
    prefix: Annotated[str, typer.Option(help="where the pointers sit in a project, e.g. runs/2026-11-26")],
    git_repo: Annotated[str, typer.Option(help="also commit the pointers to this git repository…")] = "",
    git_branch: Annotated[str, typer.Option(help="…on this branch (created from the default branch if new)")] = "",
) -> None:
    """Push output folders into a DVC remote (DVC's API and layout) and write `.dvc` pointers, so that
    `dvc pull PREFIX` in a clone of a project using that remote gets exactly these bytes."""
    from jointdistill.cloud.dvc_results import push

    outputs: dict[str, str | Path] = {}
    for item in output:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"--output {item!r}: expected NAME=FOLDER")
        outputs[name] = folder
    record = push(outputs, remote, out, prefix, git_repo, git_branch)
    for name, o in record["outputs"].items():
        typer.echo(f"{name}: {o['md5']} ({o['nfiles']} files) → {out / prefix / (name + '.dvc')}")
    if "git" in record:
        typer.echo(
            f"committed to {record['git']['repo']} branch {record['git']['branch']} ({record['git']['commit'][:12]})"
        )


ABLATION_MODES = "single,mtl,self_train,static_kd,adaptive,adaptive+deficit,full"


def _ablation_rows(modes: str | None, vary: list[str] | None, seeds: str, each: bool = False) -> dict:
    """An ablation's rows and seeds from the command line (`ablate`, `pipeline … --ablation`)."""
    from jointdistill import ablation as stage
    from jointdistill.errors import ConfigError

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    grid = stage.parse_vary(vary) if vary else None
    if grid and modes is not None:
        raise ConfigError("--vary and --modes: give one (a grid's student mode is distill.mode; use --set)")
    if each and not grid:
        raise ConfigError("--one-at-a-time varies the keys of --vary: give at least one --vary KEY=V1,V2,...")
    mode_list = [m.strip() for m in (ABLATION_MODES if modes is None else modes).split(",") if m.strip()]
    return {"modes": mode_list, "vary": grid, "seeds": seed_list, "each": each}


ModesOpt = Annotated[
    str | None,
    typer.Option(
        help="comma-separated (default: " + ABLATION_MODES + "): single, mtl, self_train, static_kd, "
        "adaptive, full. A KD mode "
        "may add variants: +cache or +live (teacher cache on or off), +progress "
        "or +deficit (feedback direction), +level, +rate or +closed (feedback kind), +valid or +all "
        "(pixels of the depth KD term), e.g. full+deficit; mtl, self_train and static_kd take +noval "
        "(val frames trained on, last weights kept)."
    ),
]
VaryOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="instead of --modes, a grid over params keys: KEY=V1,V2,... (repeatable; every combination is "
        "a row), e.g. --vary distill.alpha=0,1,1.5,2. Each point is paired by seed against the values params "
        "gives those keys (added when missing); the student's mode is distill.mode."
    ),
]
EachOpt = Annotated[
    bool,
    typer.Option(
        "--one-at-a-time",
        help="with several --vary keys: vary each key alone, the others at params' values, every point paired "
        "against one shared row (reference) -- a sensitivity sweep, instead of every combination",
    ),
]
SeedsOpt = Annotated[
    str, typer.Option(help="comma-separated seeds (labelled frames, initialisation, order, augmentation)")
]


@app.command("ablate")
@_friendly
def ablate(
    modes: ModesOpt = None,
    vary: VaryOpt = None,
    one_at_a_time: EachOpt = False,
    seeds: SeedsOpt = "0,1,2,3,4",
    data: Annotated[
        Path | None,
        typer.Option(
            help="one prepared folder for every seed (default: each seed prepares its own, "
            "OUT/runs/seed-S/prepared, so the seed draws the labelled frames)"
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder (runs/ and the table)")] = Path(
        "data/ablation"
    ),
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    jobs: Annotated[
        int,
        typer.Option(
            min=1,
            help="seeds trained at once, each in its own process with an equal "
            "share of the CPU threads (2 on a 2-core CPU: faster than 1)",
        ),
    ] = 1,
    finished: Annotated[
        bool,
        typer.Option(
            "--finished",
            help="train nothing: tabulate the runs already finished (of a running or interrupted ablation); "
            "the table gives each row's seed count",
        ),
    ] = False,
) -> None:
    """The ablation study: teachers and one student per mode for every seed, evaluated on test.

    Runs one seed after another in-process (or --jobs seeds at once). Each seed prepares its own data (the seed
    draws which frames of the label budget are labelled; the test split is the same for every seed), unless
    --data names one prepared folder for all.
    Writes OUT/ablation.md (mean and std per mode, paired differences with 95 % intervals, the teachers-vs-mtl
    gate), OUT/ablation.csv, OUT/ablation.json, OUT/ablation.png, OUT/paired.png, OUT/runs.csv (every seed) and
    OUT/runs/seed-S/ (each run's normal stage outputs). Finished runs with the
    same params are reused and interrupted ones resume, so re-running a killed ablation continues it.

    With --vary, the rows are a grid's points instead of modes, each paired by seed against the reference point
    (the values params gives the grid's keys), e.g. --vary distill.alpha=0,1,1.5,2. With several --vary keys,
    every combination is a row; --one-at-a-time varies each key alone around params' values instead (one
    reference row, a paired-KEY.png plot per key).
    """
    from jointdistill import ablation as stage
    from jointdistill.config import load_params

    cfg = load_params(params, set_)
    rows = _ablation_rows(modes, vary, seeds, one_at_a_time)
    stage.run(cfg, data, out, rows["modes"], rows["seeds"], jobs, rows["vary"], not finished, rows["each"])
    typer.echo((out / "ablation.md").read_text())
    typer.echo(f"→ {out / 'ablation.md'}, {out / 'ablation.csv'}, {out / 'ablation.png'}, {out / 'paired.png'}")


@app.command("tune")
@_friendly
def tune(
    space: Annotated[
        list[str],
        typer.Option(
            help="a searched params key (repeatable): KEY=double:LOW:HIGH[:STEP], KEY=int:LOW:HIGH[:STEP], "
            "KEY=categorical:A,B,... or KEY=discrete:1,2,4; e.g. distill.alpha=double:0:2. Keys of seed, "
            "augment, student and distill (what a student trial reads)"
        ),
    ],
    data: Annotated[str, typer.Option(help="prepared data the trials read, as the cluster sees it (gs://…)")],
    teachers: Annotated[
        tuple[str, str], typer.Option(help="the two teacher folders (seg, then depth) as the cluster sees them")
    ],
    name: Annotated[str, typer.Option(help="the Experiment's name (a Kubernetes name)")] = "jointdistill-tune",
    metric: Annotated[
        str, typer.Option(help="the val metric to optimise: mt_score, miou, delta1 (maximised), abs_err, rel_err")
    ] = "mt_score",
    algorithm: Annotated[str, typer.Option(help="random, grid, tpe, bayesianoptimization or cmaes")] = "random",
    max_trials: Annotated[int, typer.Option(min=1, help="trials in all")] = 12,
    parallel_trials: Annotated[int, typer.Option(min=1, help="trials at once")] = 3,
    max_failed_trials: Annotated[int, typer.Option(min=0, help="failed trials before the Experiment fails")] = 3,
    image: Annotated[str | None, typer.Option(help="the trials' image (default: the pipeline's)")] = None,
    namespace: Annotated[str | None, typer.Option(help="namespace (default: the kubeconfig context's)")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="the Experiment as YAML")] = Path("experiment.yaml"),
    submit: Annotated[bool, typer.Option(help="also create it through the Kubernetes API (kubeconfig)")] = False,
    wait: Annotated[bool, typer.Option(help="with --submit: wait for it and print the best trial")] = False,
    poll_interval: Annotated[float, typer.Option(min=0.01, help="seconds between status reads with --wait")] = 30.0,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Write a Katib Experiment (kubeflow.org/v1beta1) that tunes the student on a val metric.

    Each trial is a Kubernetes Job on the project's image: `jointdistill distill` with the run's params (these
    params with any --set) and the trial's values, then one `val_<metric>=<value>` line for Katib's StdOut
    collector. A trial's pod asks for the pipeline's distill resources (pipeline.distill, node_selector,
    tolerations). Test is never read.
    """
    import yaml

    from jointdistill.cloud import katib
    from jointdistill.config import load_params
    from jointdistill.io import atomic_write_text
    from jointdistill.pipelines.pipeline import DEFAULT_IMAGE

    cfg = load_params(params, set_)
    searched = katib.parse_space(space, cfg)
    body = katib.experiment(
        cfg,
        searched,
        name=name,
        data=data,
        teachers=teachers,
        metric=metric,
        image=image or DEFAULT_IMAGE,
        namespace=namespace,
        algorithm=algorithm,
        max_trials=max_trials,
        parallel_trials=parallel_trials,
        max_failed_trials=max_failed_trials,
    )
    atomic_write_text(out, yaml.safe_dump(body, sort_keys=False))
    typer.echo(f"Katib Experiment {name} ({len(searched)} parameters, {max_trials} trials) → {out}")
    if not submit:
        return
    ns = namespace or katib.current_namespace()
    body["metadata"]["namespace"] = ns
    katib.submit(body, ns)
    typer.echo(f"submitted: experiments.kubeflow.org/{name} in {ns}")
    if wait:
        found = katib.best(katib.wait(name, ns, poll_interval=poll_interval))
        typer.echo(json.dumps(found, indent=2))


@app.command("objective")
@_friendly
def objective(
    folder: Annotated[Path, typer.Argument(help="a distill output folder")],
    metric: Annotated[str, typer.Option(help="mt_score, miou, delta1, abs_err or rel_err")] = "mt_score",
) -> None:
    """Print the student's val metric as one `val_<metric>=<value>` line (a Katib trial's objective)."""
    from jointdistill.cloud import katib

    typer.echo(katib.objective_line(folder, metric))


@app.command("params")
@_friendly
def show_params(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Validate a params file and print every value, defaults included, as JSON."""
    from jointdistill.config import load_params

    cfg = load_params(params, set_)
    typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))


@app.command()
@_friendly
def summary(
    data: Annotated[Path, typer.Option(help="DVC data folder")] = Path("data"),
    metrics: Annotated[Path, typer.Option(help="DVC metrics folder (run.json of each stage)")] = Path("metrics"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Say where the pipeline's outputs are and what they hold (printed at the end of `make run`)."""
    from jointdistill.stages import results

    outputs: list[tuple[str, type[results.StageResult], Path, str, str]] = [
        ("prepared data", results.PrepareResult, data / "prepared", "prepare", ""),
        ("teacher seg", results.TeacherResult, data / "teachers" / "seg", "teacher-seg", ""),
        ("teacher depth", results.TeacherResult, data / "teachers" / "depth", "teacher-depth", ""),
        ("student", results.StudentResult, data / "student", "distill", ""),
        ("evaluation", results.EvaluationResult, data / "eval", "evaluate", "report.html"),
        ("ONNX student", results.ExportResult, data / "export", "export", "student.onnx"),
    ]
    for label, kind, folder, stage, file in outputs:
        result = kind.read(folder, metrics / stage)
        if result is not None:
            typer.echo(f"{label:<14}: {(folder / file).resolve()}  ({result.headline()})")
    if (data / "prepared" / "gallery.png").exists():
        typer.echo(f"{'gallery':<14}: {(data / 'prepared' / 'gallery.png').resolve()}")


AblationOpt = Annotated[
    bool,
    typer.Option(
        "--ablation",
        help="the ablation pipeline (ParallelFor over seeds and over modes or grid points, one aggregate table) "
        "instead of the main one",
    ),
]


@pipeline_app.command("compile")
@_friendly
def pipeline_compile(
    output: Annotated[Path, typer.Option("--output", "-o", help="IR YAML to write")] = Path("jointdistill.yaml"),
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    image: Annotated[str | None, typer.Option(help="container image for every step")] = None,
    ablation: AblationOpt = False,
    modes: ModesOpt = None,
    vary: VaryOpt = None,
    one_at_a_time: EachOpt = False,
    seeds: SeedsOpt = "0,1,2,3,4",
) -> None:
    """Compile the Kubeflow pipeline to one IR YAML file; params become the pipeline's default parameters.

    With --ablation, the ablation pipeline instead (default file jointdistill-ablation.yaml): per seed its data
    and teachers, per mode (or --vary grid point) a student, one table of paired differences; --modes, --vary
    and --seeds as `jointdistill ablate` takes them."""
    from jointdistill.config import load_params

    cfg = load_params(params, set_)
    if ablation:
        from jointdistill.pipelines import ablation as kfp_ablation

        output = Path(kfp_ablation.COMPILED) if output == Path("jointdistill.yaml") else output
        kfp_ablation.compile_pipeline(output, cfg, image, **_ablation_rows(modes, vary, seeds, one_at_a_time))
    else:
        _no_ablation_rows(modes, vary, one_at_a_time)
        from jointdistill.pipelines import pipeline as kfp_pipeline

        kfp_pipeline.compile_pipeline(output, cfg, image=image)
    typer.echo(f"compiled → {output}")


def _no_ablation_rows(modes, vary, each: bool) -> None:
    from jointdistill.errors import ConfigError

    if modes is not None or vary or each:
        raise ConfigError("--modes, --vary and --one-at-a-time choose the ablation pipeline's rows: add --ablation")


DataRepoOpt = Annotated[
    str,
    typer.Option(
        help="DVC project (git URL or path) to take the data from (default: the embedded synthetic generator)"
    ),
]
DataRevOpt = Annotated[str, typer.Option(help="its revision: tag, branch or commit")]
DataPathOpt = Annotated[
    str,
    typer.Option(
        help="DVC-tracked path in it: a raw dataset (read as prepare.dataset says) or a prepared one (data/prepared)"
    ),
]
ResultsRemoteOpt = Annotated[
    str,
    typer.Option(
        help="push the run's outputs to this DVC remote (e.g. your "
        "project's gs://bucket/dvc) as a last step (default: off)"
    ),
]
ResultsPrefixOpt = Annotated[str, typer.Option(help="where the .dvc pointers sit (default: runs/<run name>)")]
ResultsGitRepoOpt = Annotated[str, typer.Option(help="also commit the pointers to this git repository…")]
ResultsGitBranchOpt = Annotated[str, typer.Option(help="…on this branch")]


def _run_arguments(
    data_repo, data_rev, data_path, results_remote, results_prefix, results_git_repo, results_git_branch
) -> dict[str, str]:
    """The pipeline's string parameters given on the command line (unset ones keep their defaults)."""
    args = {
        "data_repo": data_repo,
        "data_rev": data_rev,
        "data_path": data_path,
        "results_remote": results_remote,
        "results_prefix": results_prefix,
        "results_git_repo": results_git_repo,
        "results_git_branch": results_git_branch,
    }
    return {k: v for k, v in args.items() if v}


class JobStage(StrEnum):
    teacher_seg = "teacher-seg"
    teacher_depth = "teacher-depth"
    distill = "distill"


@pipeline_app.command("trainjob")
@_friendly
def pipeline_trainjob(
    stage: Annotated[JobStage, typer.Argument(help="which training step")],
    root: Annotated[str, typer.Option(help="gs:// folder the job reads its inputs from and writes its output to")],
    image: Annotated[str | None, typer.Option(help="container image (default: the pipeline's)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Print the Kubeflow Trainer TrainJob (YAML) that a training step launches with pipeline.trainjob.enabled.

    Inputs are read from ROOT/prepared (and ROOT/teacher-seg, ROOT/teacher-depth for distill) and the output goes
    to ROOT/STAGE.trainjob, with the params at ROOT/STAGE.trainjob.params.json: `kubectl apply -f` it after
    uploading those, or just review what the pipeline will submit.
    """
    import yaml

    from jointdistill.cloud import trainjob
    from jointdistill.config import load_params
    from jointdistill.pipelines.pipeline import DEFAULT_IMAGE

    cfg = load_params(params, set_)
    root = root.rstrip("/")
    kind, _, task = stage.value.partition("-")
    out = f"{root}/{stage.value}"
    teachers = (f"{root}/teacher-seg", f"{root}/teacher-depth") if kind == "distill" else None
    req = trainjob.request(
        cfg,
        kind,
        image or DEFAULT_IMAGE,
        f"{trainjob.staging_url(out)}.params.json",
        f"{root}/prepared",
        out,
        task or None,
        teachers,
    )
    typer.echo(yaml.safe_dump(trainjob.manifest(req), sort_keys=False).rstrip())


@pipeline_app.command("submit")
@_friendly
def pipeline_submit(
    host: Annotated[
        str,
        typer.Option(
            envvar="KF_PIPELINES_ENDPOINT", help="Kubeflow Pipelines API, e.g. https://kubeflow.example.com/pipeline"
        ),
    ],
    experiment: Annotated[str, typer.Option(help="experiment to file the run under (created if missing)")] = (
        "jointdistill"
    ),
    run_name: Annotated[str | None, typer.Option(help="(default: jointdistill-<params digest>)")] = None,
    image: Annotated[str | None, typer.Option(help="container image for every step")] = None,
    cache: Annotated[
        bool | None, typer.Option("--cache/--no-cache", help="override every step's caching for this run")
    ] = None,
    data_repo: DataRepoOpt = "",
    data_rev: DataRevOpt = "",
    data_path: DataPathOpt = "",
    results_remote: ResultsRemoteOpt = "",
    results_prefix: ResultsPrefixOpt = "",
    results_git_repo: ResultsGitRepoOpt = "",
    results_git_branch: ResultsGitBranchOpt = "",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Compile the pipeline and start a run on a Kubeflow Pipelines server (kfp.Client).

    The run's `params` input is params.yaml (with any --set). A bearer token for the API is read from
    $KFP_TOKEN when set (e.g. KFP_TOKEN=$(gcloud auth print-access-token) or a service-account token)."""
    import os

    from jointdistill.config import load_params
    from jointdistill.errors import OutputError
    from jointdistill.pipelines import pipeline as kfp_pipeline

    cfg = load_params(params, set_)
    try:
        run = kfp_pipeline.submit(
            cfg,
            host,
            experiment,
            run_name,
            image,
            cache,
            os.environ.get("KFP_TOKEN"),
            arguments=_run_arguments(
                data_repo, data_rev, data_path, results_remote, results_prefix, results_git_repo, results_git_branch
            ),
        )
    except (OSError, ValueError) as exc:
        raise OutputError(f"submit to {host}: {exc}") from None
    except Exception as exc:  # kfp_server_api.ApiException and urllib3 errors: the server said no
        status = getattr(exc, "status", None)
        raise OutputError(
            f"submit to {host}: {'HTTP ' + str(status) + ': ' if status else ''}"
            f"{getattr(exc, 'reason', None) or brief(exc)}"
        ) from None
    typer.echo(f"submitted run {run['run_id']} ({run['run_name']}) in experiment {run['experiment']}: {run['url']}")


@pipeline_app.command("run-local")
@_friendly
def pipeline_run_local(
    root: Annotated[Path, typer.Option(help="local pipeline root for artifacts")] = Path("kfp-local"),
    data_repo: DataRepoOpt = "",
    data_rev: DataRevOpt = "",
    data_path: DataPathOpt = "",
    results_remote: ResultsRemoteOpt = "",
    results_prefix: ResultsPrefixOpt = "",
    results_git_repo: ResultsGitRepoOpt = "",
    results_git_branch: ResultsGitBranchOpt = "",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    ablation: AblationOpt = False,
    modes: ModesOpt = None,
    vary: VaryOpt = None,
    one_at_a_time: EachOpt = False,
    seeds: SeedsOpt = "0,1,2,3,4",
) -> None:
    """Run the pipeline on this machine with kfp.local (SubprocessRunner, current environment).

    kfp.local ignores resource requests and accelerators. With --ablation, the ablation pipeline (its table is
    the `ablation` output folder)."""
    from jointdistill.config import load_params
    from jointdistill.pipelines import pipeline as kfp_pipeline

    cfg = load_params(params, set_)
    arguments = _run_arguments(
        data_repo, data_rev, data_path, results_remote, results_prefix, results_git_repo, results_git_branch
    )
    if ablation:
        from jointdistill.errors import ConfigError
        from jointdistill.pipelines import ablation as kfp_ablation

        if arguments:
            raise ConfigError(f"--ablation prepares each seed's data as params say; it takes no {', '.join(arguments)}")
        artifacts = kfp_ablation.run_local(cfg, root, **_ablation_rows(modes, vary, seeds, one_at_a_time))
        for name, artifact in artifacts.items():
            typer.echo(f"{name}: {artifact.path}")
        return
    _no_ablation_rows(modes, vary, one_at_a_time)
    outputs = kfp_pipeline.run_local(cfg, root, **arguments)
    for name, path in outputs.items():
        typer.echo(f"{name}: {path}")


if __name__ == "__main__":  # pragma: no cover
    app()
