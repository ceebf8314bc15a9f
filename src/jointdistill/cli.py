"""The `jointdistill` command line: a thin adapter that parses options, loads params and calls a stage."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .errors import JointDistillError

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


def _friendly(fn):
    """Errors a user can cause become one line on stderr and exit status 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except JointDistillError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


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
    from .config import Params

    model = Params.model_fields[section].annotation
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
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Build the prepared dataset (DESIGN §3) from the source named by prepare.dataset.

    Writes OUT/meta.json, OUT/manifest.parquet, OUT/gallery.png and OUT/{train,val,test}/{images,labels,depth}.npy.
    The val split is a deterministic prepare.val_fraction of the source's training samples (seeded hash of the
    sample id); the source's own test split becomes test. Params read: seed, prepare.*.
    """
    from .config import load_params
    from .stages import prepare as stage

    cfg = load_params(params, set_)
    meta = stage.run(cfg, out)
    counts = meta["counts"]
    typer.echo(
        f"prepared {meta['dataset']} → {out}  (train {counts['train']}, val {counts['val']}, test {counts['test']}; "
        f"gallery: {out / 'gallery.png'})"
    )


@app.command("params")
@_friendly
def show_params(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Validate a params file and print every value, defaults included, as JSON."""
    from .config import load_params

    cfg = load_params(params, set_)
    typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))


@app.command()
@_friendly
def summary(
    data: Annotated[Path, typer.Option(help="DVC data folder")] = Path("data"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Say where the pipeline's outputs are and what they hold (printed at the end of `make run`)."""
    from .data.contract import read_meta

    prepared = data / "prepared"
    meta = read_meta(prepared)
    c = meta["counts"]
    h, w = meta["resolution"]
    typer.echo(f"prepared data : {prepared.resolve()}  ({meta['dataset']}, {h}×{w}; "
               f"train {c['train']}, val {c['val']}, test {c['test']})")
    if (prepared / "gallery.png").exists():
        typer.echo(f"gallery       : {(prepared / 'gallery.png').resolve()}")


@pipeline_app.command("compile")
@_friendly
def pipeline_compile(
    output: Annotated[Path, typer.Option("--output", "-o", help="IR YAML to write")] = Path("jointdistill.yaml"),
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    image: Annotated[str | None, typer.Option(help="container image for every step")] = None,
) -> None:
    """Compile the Kubeflow pipeline to one IR YAML file; params become the pipeline's default parameters."""
    from .config import load_params
    from .pipelines import pipeline as kfp_pipeline

    cfg = load_params(params, set_)
    kfp_pipeline.compile_pipeline(output, cfg, image=image)
    typer.echo(f"compiled → {output}")


@pipeline_app.command("run-local")
@_friendly
def pipeline_run_local(
    root: Annotated[Path, typer.Option(help="local pipeline root for artifacts")] = Path("kfp-local"),
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Run the pipeline on this machine with kfp.local (SubprocessRunner, current environment).

    kfp.local ignores resource requests and accelerators."""
    from .config import load_params
    from .pipelines import pipeline as kfp_pipeline

    cfg = load_params(params, set_)
    outputs = kfp_pipeline.run_local(cfg, root)
    for name, path in outputs.items():
        typer.echo(f"{name}: {path}")


if __name__ == "__main__":  # pragma: no cover
    app()
