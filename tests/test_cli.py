import subprocess
import sys

from jointdistill.data.contract import verify_prepared

from .conftest import REPO, TINY


def cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "jointdistill", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_prepare_help_explains_every_option():
    r = cli("prepare", "--help")
    assert r.returncode == 0
    for option in ("--out", "--params", "--set", "prepare.val_fraction", "meta.json", "gallery.png"):
        assert option in r.stdout, option


def test_top_level_help_and_version():
    r = cli("--help")
    assert r.returncode == 0 and "prepare" in r.stdout and "pipeline" in r.stdout
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip()


def test_prepare_runs_with_overrides(tmp_path):
    sets = [a for s in TINY for a in ("--set", s)]
    r = cli("prepare", "--params", str(REPO / "params.yaml"), *sets, "--out", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr
    assert "gallery" in r.stdout
    assert verify_prepared(tmp_path / "p")["resolution"] == [48, 96]


def test_bad_param_is_one_line_without_traceback(tmp_path):
    r = cli("prepare", "--set", "prepare.hieght=3", "--out", str(tmp_path / "p"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "prepare.hieght: unknown key; did you mean 'prepare.height'" in lines[0]
    assert not (tmp_path / "p").exists()


def test_params_command_prints_defaults():
    r = cli("params", "--set", "seed=4")
    assert r.returncode == 0 and '"seed": 4' in r.stdout and '"val_fraction": 0.15' in r.stdout


def _commands(group, prefix=()):
    """Every command path of the CLI, sub-groups included, e.g. ("pipeline", "compile")."""
    import typer.main

    click_group = typer.main.get_command(group) if not hasattr(group, "commands") else group
    for name, cmd in click_group.commands.items():
        if hasattr(cmd, "commands") and cmd.commands:
            yield from _commands(cmd, (*prefix, name))
            yield (*prefix, name)
        else:
            yield (*prefix, name)


def test_help_of_every_command_reads_as_sentences():
    """--help renders for every command: whole sentences (no line broken where the source wrapped), no Python
    type names or <bool> on flags, nothing pointing at a document outside the repo."""
    from typer.testing import CliRunner

    from jointdistill.cli import app

    paths = list(_commands(app))
    assert ("distill",) in paths and ("pipeline", "compile") in paths and ("serve", "manifest") in paths
    for path in paths:
        r = CliRunner().invoke(app, [*path, "--help"], terminal_width=200, env={"COLUMNS": "200"})
        assert r.exit_code == 0, (path, r.output[-2000:])
        text = r.output
        for bad in ("<bool>", "<str>", "<path>", "<int>", "list[", "DESIGN", "Traceback"):
            assert bad not in text, (path, bad)
    # At 200 columns the distill description's first paragraph of detail is one piece: the sentence that the
    # source wrapped after "predictions on" continues on the same line.
    r = CliRunner().invoke(app, ["distill", "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert "adaptive (+ feedback-driven teacher weights ω)" in " ".join(r.output.split())
    assert "predictions on the raw frames" in r.output
