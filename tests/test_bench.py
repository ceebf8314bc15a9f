"""The benchmark harness. Benchmarks measure, tests do not: every suite at toy sizes runs in `make test-bench`
(marked `bench`, outside `make test`); `make test` keeps one smoke run of the harness and the generated page."""

import json
import shutil

import pytest

from bench import __main__ as bench_main
from bench import docs

from .conftest import REPO


@pytest.mark.smoke
def test_smoke_one_suite_writes_its_json_and_table(tmp_path):
    # The loader suite: the quickest that runs a training step (the data suite's quick run takes 3x as long).
    committed = {p: p.read_bytes() for p in (docs.RESULTS / "loader.md", docs.PAGE)}
    assert bench_main.main(["--quick", "--out", str(tmp_path), "--only", "loader"]) == 0
    data = json.loads((tmp_path / "loader.json").read_text())
    assert data["results"] and data["machine"]["logical_cpus"] >= 1
    for row in data["results"]:
        assert row["min"] <= row["median"] <= row["max"] and row["min"] > 0 and row["unit"]
    table = (tmp_path / "loader.md").read_text()
    assert table.startswith("# Benchmarks: loader") and "| benchmark | median |" in table
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == len(data["results"]) + 1
    assert {p: p.read_bytes() for p in committed} == committed  # --out elsewhere: the committed results stay


def test_the_benchmarks_page_is_generated_from_the_results(tmp_path, monkeypatch):
    assert docs.main(["--check"]) == 0, "docs/benchmarks.md is out of date: run `python -m bench.docs`"
    # A results file that changes makes the committed page out of date, and writing it brings it back.
    results, page = tmp_path / "results", tmp_path / "benchmarks.md"
    shutil.copytree(docs.RESULTS, results, ignore=shutil.ignore_patterns("*.png", "*.parquet"))
    monkeypatch.setattr(docs, "RESULTS", results)
    monkeypatch.setattr(docs, "PAGE", page)
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    docs.write()
    assert docs.main(["--check"]) == 0
    text = page.read_text()
    assert "## Does distillation pay? (`make ablation`)" in text and "\n# Benchmarks:" not in text
    assert "Source: [bench/results/serve.md](../bench/results/serve.md)" in text
    (results / "serve.md").write_text((results / "serve.md").read_text() + "\n- a new row\n")
    assert docs.main(["--check"]) == 1
    docs.write()
    assert docs.main(["--check"]) == 0 and "- a new row" in page.read_text()
    # A one-key-at-a-time sweep's per-key plots are shown under its table.
    sweep = results / "ablation" / "open-questions"
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "ablation.md").write_text("Ablation on test.\n")
    (sweep / "paired-distill.alpha.png").write_bytes(b"png")
    docs.write()
    shown = "![distill.alpha: paired differences against the reference](../bench/results/ablation/open-questions/"
    assert shown + "paired-distill.alpha.png)" in page.read_text()


def _results(folder, suite: str) -> list[dict]:
    return json.loads((folder / f"{suite}.json").read_text())["results"]


@pytest.mark.bench
def test_bench_quick_writes_results(tmp_path):
    only = "data,loader,teachers,distill,distill-steps,export,ablation"
    assert bench_main.main(["--quick", "--out", str(tmp_path), "--only", only]) == 0
    data = json.loads((tmp_path / "data.json").read_text())
    names = [row["name"] for row in data["results"]]
    assert any("generator 128×256" in n for n in names) and any(n.startswith("prepare") for n in names)
    for row in data["results"]:
        assert row["min"] <= row["median"] <= row["max"] and row["min"] > 0
    assert data["machine"]["logical_cpus"] >= 1
    table = (tmp_path / "data.md").read_text()
    assert "| benchmark | median |" in table and "frames/s" in table
    loader = {r["name"]: r for r in json.loads((tmp_path / "loader.json").read_text())["results"]}
    step = loader.pop("student training step (mtl, default student, batch of distill.batch_size)")["median"]
    assert len(loader) == 3 and all(0 < r["median"] and r["ok"] == (r["median"] <= 0.2 * step) for r in loader.values())
    teachers = json.loads((tmp_path / "teachers.json").read_text())["results"]
    assert any(r["name"].startswith("seg teacher test miou") and "target" in r for r in teachers)
    assert any(r["name"].startswith("depth teacher test abs_err") for r in teachers)
    distilled = json.loads((tmp_path / "distill.json").read_text())["results"]
    modes = {r["name"]: r for r in distilled if r["name"].startswith("distill step")}
    assert len(modes) == 6 and modes["distill step, mtl (epoch 2)"]["ratio_vs_mtl"] == 1.0
    assert all(r["ratio_vs_mtl"] > 0 for r in modes.values())
    cached = modes["distill step, full + teacher cache (epoch 2)"]
    assert cached["target"] == "≤ 1.25× mtl" and "cache built once" not in cached["note"]  # static_kd built it
    assert "cache built once" in modes["distill step, static_kd + teacher cache (epoch 2)"]["note"]
    turns = {r["name"].split(",", 1)[1].split(" / ")[0].strip(): r for r in _results(tmp_path, "distill-steps")}
    assert list(turns) == ["full", "full, no trajectory pass", "full, connector_channels 48"]
    assert turns["full"]["ok"] == (turns["full"]["median"] <= 1.25) and all(r["median"] > 0 for r in turns.values())
    storage = next(r for r in distilled if r["name"].startswith("trajectory storage"))
    assert 0 < storage["median"] < 100
    ablation = json.loads((tmp_path / "ablation.json").read_text())["results"]
    assert [r["name"].split(":")[1].split("(")[0].strip() for r in ablation] == ["single", "mtl", "full"]
    assert ablation[0]["median"] == 0.0  # the teachers are the reference
    latency = json.loads((tmp_path / "export.json").read_text())["results"]
    assert len(latency) == 8 and all(0 < r["min"] <= r["median"] <= r["max"] for r in latency)
    assert {r["target"] for r in latency if "target" in r} == {
        "≤ 0.8× student eager",
        "≤ 0.5× both teachers eager",
        "student onnx ≤ 0.5× this",
    }


@pytest.mark.bench
def test_bench_serve_quick(tiny_export):
    """The load benchmark against a real server process: every level answered, the rows it promises."""
    from bench import serve as serve_bench

    root, _ = tiny_export
    rows = {r["name"]: r for r in serve_bench.rows(True, str(REPO / "params.yaml"), root / "export" / "student.onnx")}
    assert rows["server errors over all levels"]["median"] == 0
    single = {n: r for n, r in rows.items() if n.startswith("server latency, tensor") and n.endswith("concurrency 1")}
    assert [n.split(",")[1].strip() for n in single] == ["tensor 48×96", "tensor 96×192"]
    for r in single.values():
        assert r["target"] == "p50 ≤ 1.2× onnxruntime direct" and r["ok"] == (r["overhead"] <= 0.20)
        assert 0 < r["min"] <= r["median"] <= r["max"]
    for key in (
        "tensor 48×96, concurrency 4",
        "tensor 48×96, concurrency 16",
        "PNG 48×96 (image_bytes), concurrency 1",
    ):
        assert "0 errors" in rows[f"server latency, {key}"]["note"]
    growth = rows["server RSS growth over the run"]
    assert growth["ok"] == (growth["median"] <= 10) and "MB when ready" in growth["note"]


@pytest.mark.bench
def test_bench_gpu_suite_runs_on_cpu():
    """The GPU training bench at toy sizes on the CPU: every configuration steps, FLOPs are counted, the
    table has its MFU notes and the distill/mtl ratio rows (its numbers mean something only on a GPU)."""
    from bench import gpu

    res = gpu.run(True, str(REPO / "params.yaml"))
    assert [(r["config"], r["variant"]) for r in res["steps"]] == [
        (k, gpu.VARIANTS[v]["name"]) for k, v in gpu.QUICK_PLAN
    ]
    assert all("error" not in r and r["flops_per_step"] > 0 and r["images_per_s"] > 0 for r in res["steps"])
    flops = {r["config"]: r["flops_per_step"] for r in res["steps"]}
    # The teachers' forward is what the cache saves; the trajectory pass is what it does not.
    assert flops["distill-full"] > flops["distill-full-cache"] > flops["distill-mtl"]
    rows = {r["name"]: r for r in gpu.table_rows(res)}
    seg = rows["teacher-seg step, fp32"]
    assert seg["mfu"] > 0 and "FLOP-bound limit" in seg["note"] and "MFU" in seg["note"]
    assert res["epoch"]["images_per_s"] > 0 and res["loader"][0]["images"] > 0
