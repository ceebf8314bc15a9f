"""The export stage (ONNX graph, metadata, parity gate, variants) and `predict` (onnxruntime, no torch)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from jointdistill.config import load_params
from jointdistill.data.prepared import PreparedDataset
from jointdistill.errors import ModelError
from jointdistill.models import build_student, load_model
from jointdistill.models.export import OnnxStudent, export_onnx
from jointdistill.serving.infer import StudentSession, choose_providers, read_metadata
from jointdistill.stages import export

from .conftest import EXPORT, NO_TORCH, REPO

FAST = EXPORT


def params(*extra):
    return load_params(REPO / "params.yaml", [*FAST, *extra])


@pytest.fixture(scope="module")
def exported(tiny_export):
    return tiny_export


def eager(model, x: np.ndarray):
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    return out["seg"].numpy(), out["depth"].numpy()


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- the export stage
def test_outputs_pass_the_checker_and_parity(exported, prepared):
    root, report = exported
    out = root / "export"
    assert {p.name for p in out.iterdir()} == {
        "student.onnx",
        "student.fp16.onnx",
        "student.int8.onnx",
        "parity.json",
        "report.json",
        "metrics.json",
        "run.json",
        "MODEL_CARD.md",
        "lineage.json",
    }
    for name in ("student.onnx", "student.fp16.onnx", "student.int8.onnx"):
        onnx.checker.check_model(str(out / name), full_check=True)
        model = onnx.load(str(out / name))
        assert [i.name for i in model.graph.input] == ["image"]
        assert [o.name for o in model.graph.output] == ["segmentation_logits", "depth"]
        for value in [*model.graph.input, *model.graph.output]:  # float32 I/O in every variant
            assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert max(op.version for op in onnx.load(str(out / "student.onnx")).opset_import if op.domain == "") >= 18
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and not parity["problems"]
    val_count = json.loads((prepared / "meta.json").read_text())["counts"]["val"]
    assert parity["fp32"]["val"]["images"] == val_count  # parity_images=0: all of val
    assert parity["fp32"]["val"]["depth"]["max_rel_err"] < 1e-4
    assert parity["fp32"]["val"]["segmentation_logits"]["argmax_agreement"] >= 0.999
    shapes = [row["shape"] for row in parity["fp32"]["shapes"]]
    assert [1, 3, 48, 96] in shapes and [3, 3, 48, 96] in shapes and len(shapes) == 4
    metrics = json.loads((out / "report.json").read_text())
    onnx_m, torch_m = metrics["test"], metrics["test_by_model"]["pytorch"]
    assert onnx_m["miou"] == pytest.approx(torch_m["miou"], abs=1e-3)
    assert onnx_m["abs_err"] == pytest.approx(torch_m["abs_err"], rel=1e-4)
    assert set(metrics["test_by_model"]) == {"pytorch", "onnx", "fp16", "int8-static"}
    run = json.loads((out / "run.json").read_text())  # latency depends on the machine: beside the content
    assert set(run["latency_ms"]["onnx"]) == {"batch1_ms", "batch8_ms"} and "latency_ms" not in metrics
    curated = json.loads((out / "metrics.json").read_text())  # what the inputs determine only
    assert set(curated) == {"size_mb"} and curated["size_mb"] == pytest.approx(metrics["file_bytes"]["fp32"] / 1e6)
    assert metrics["file_bytes"]["int8-static"] < metrics["file_bytes"]["fp32"] / 2
    card = (out / "MODEL_CARD.md").read_text()
    for needle in (
        "segmentation_logits",
        "vehicle",
        "multiples of 8",
        f"{onnx_m['miou']:.4f}",
        "Latency",
        "`INFERENCE_PRECISION_HINT` set to `f32`",
        "argmax agreement",
        "int8-static",
    ):
        assert needle in card, needle


def test_metadata_round_trip(exported, prepared):
    root, _ = exported
    meta = json.loads((prepared / "meta.json").read_text())
    _, record = load_model(root / "student" / "student.pt")
    props = {p.key: p.value for p in onnx.load(str(root / "export" / "student.onnx")).metadata_props}
    decoded = {k: json.loads(v) for k, v in props.items()}  # every value is JSON
    assert decoded["classes"] == meta["classes"] and decoded["palette"] == meta["palette"]
    assert decoded["mean"] == meta["normalization"]["mean"] and decoded["std"] == meta["normalization"]["std"]
    assert decoded["input_size"] == [48, 96] and decoded["size_multiple"] == 8 and decoded["depth_unit"] == "m"
    assert decoded["params_digest"] == record["params_digest"] and decoded["variant"] == "fp32"
    assert decoded["code_digest"].startswith("sha256:") and decoded["format"] == "jointdistill.onnx/1"
    assert read_metadata(props)["classes"] == meta["classes"]
    int8 = {p.key: json.loads(p.value) for p in onnx.load(str(root / "export" / "student.int8.onnx")).metadata_props}
    assert int8["variant"] == "int8-static" and int8["classes"] == meta["classes"]


def test_the_file_names_no_path_of_the_checkout_that_built_it(exported):
    """The exporter's per-node stack traces (absolute paths, line numbers) are dropped: the same student gives
    the same bytes whatever directory it is exported from."""
    root, _ = exported
    for path in (root / "export").glob("*.onnx"):
        model = onnx.load(str(path))
        assert model.graph.node, path
        keys = {p.key for n in model.graph.node for p in n.metadata_props}
        assert "pkg.torch.onnx.stack_trace" not in keys, path
        assert str(REPO).encode() not in path.read_bytes() and b"site-packages" not in path.read_bytes(), path


def test_dynamic_batch_and_size_on_random_and_real_inputs(exported, prepared):
    root, _ = exported
    model, _ = load_model(root / "student" / "student.pt")
    model.eval()
    s = session(root / "export" / "student.onnx")
    val = PreparedDataset(prepared, "val")
    real = torch.stack([val[i % len(val)]["image"] for i in range(3)]).numpy()
    rng = np.random.default_rng(0)
    inputs = [
        real[:1],
        real,
        rng.standard_normal((3, 3, 48, 96), dtype=np.float32),
        rng.standard_normal((1, 3, 32, 64), dtype=np.float32),  # sizes never traced
        rng.standard_normal((2, 3, 72, 136), dtype=np.float32),
    ]
    for x in inputs:
        seg, depth = s.run(None, {"image": x})
        ref_seg, ref_depth = eager(model, x)
        assert seg.shape == ref_seg.shape and depth.shape == ref_depth.shape == (x.shape[0], 1, *x.shape[2:])
        assert np.abs(seg - ref_seg).max() < 1e-4
        assert (np.abs(depth - ref_depth) / ref_depth).max() < 1e-4
        assert (seg.argmax(1) == ref_seg.argmax(1)).mean() >= 0.999


def test_variants_run_and_stay_close(exported, prepared):
    root, report = exported
    val = PreparedDataset(prepared, "val")
    x = torch.stack([val[i]["image"] for i in range(2)]).numpy()
    ref_seg, ref_depth = session(root / "export" / "student.onnx").run(None, {"image": x})
    for name in ("student.fp16.onnx", "student.int8.onnx"):
        seg, depth = session(root / "export" / name).run(None, {"image": x})
        assert seg.dtype == depth.dtype == np.float32 and seg.shape == ref_seg.shape
        assert (seg.argmax(1) == ref_seg.argmax(1)).mean() > 0.9
        assert np.median(np.abs(depth - ref_depth) / ref_depth) < 0.05
    fp32, int8 = report["test_by_model"]["onnx"], report["test_by_model"]["int8-static"]
    assert abs(int8["miou"] - fp32["miou"]) < 0.05 and abs(int8["abs_err"] / fp32["abs_err"] - 1) < 0.1
    assert report["parity"]["variants"]["fp16"]["val"]["depth"]["max_rel_err"] < 1e-2


def test_failed_parity_gate_writes_no_model_and_keeps_the_previous_export(exported, prepared, tmp_path):
    root, _ = exported
    out = tmp_path / "export"
    shutil.copytree(root / "export", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    strict = params("export.depth_rel_tol=1e-12", "export.fp16=false", "export.int8=none")
    with pytest.raises(ModelError, match="does not match PyTorch.*depth max relative error"):
        export.run(strict, prepared, root / "student", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous export, untouched
    failed = json.loads((tmp_path / "export.parity-failed.json").read_text())
    assert not failed["passed"] and failed["problems"]
    assert not list(tmp_path.glob("**/.*.onnx")) and sorted(p.name for p in tmp_path.iterdir()) == [
        "export",
        "export.parity-failed.json",
    ]
    # A later successful export removes the stale failure report.
    export.run(params("export.fp16=false", "export.int8=none"), prepared, root / "student", out)
    assert not (tmp_path / "export.parity-failed.json").exists()
    assert {p.name for p in out.iterdir()} == {
        "student.onnx",
        "parity.json",
        "report.json",
        "metrics.json",
        "run.json",
        "MODEL_CARD.md",
        "lineage.json",
    }


def test_fixed_size_export_says_so_and_refuses_other_sizes(exported, prepared, tmp_path):
    root, _ = exported
    export.run(
        params("export.dynamic_size=false", "export.fp16=false", "export.int8=none"),
        prepared,
        root / "student",
        tmp_path / "fixed",
    )
    s = StudentSession(tmp_path / "fixed" / "student.onnx", "cpu")
    assert s.meta["size_multiple"] is None and s.meta["input_size"] == [48, 96]
    assert s.run(np.zeros((3, 3, 48, 96), np.float32))[0].shape == (3, 7, 48, 96)  # batch stays dynamic
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        s.run(np.zeros((1, 3, 32, 64), np.float32))
    assert "exactly 48×96" in (tmp_path / "fixed" / "MODEL_CARD.md").read_text()


def test_resnet_aspp_student_exports_with_dynamic_size(tmp_path):
    """The paper's student family (dilated ResNet encoder, ASPP head with image pooling) keeps H and W dynamic."""
    torch.manual_seed(0)
    model = build_student("resnet18", "aspp", num_classes=5, head_channels=32).eval()
    export_onnx(model, torch.randn(2, 3, 64, 96), tmp_path / "r.onnx", 18, 8)
    onnx.checker.check_model(str(tmp_path / "r.onnx"), full_check=True)
    s = session(tmp_path / "r.onnx")
    for shape in [(1, 3, 64, 96), (3, 3, 48, 128)]:
        x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
        seg, depth = s.run(None, {"image": x})
        ref_seg, ref_depth = eager(model, x)
        assert np.abs(seg - ref_seg).max() < 1e-3 and (np.abs(depth - ref_depth) / ref_depth).max() < 1e-3
    wrapped = OnnxStudent(model)
    assert [t.shape[1] for t in wrapped(torch.randn(2, 3, 64, 96))] == [5, 1]


# ----------------------------------------------------------------------------- predict
BLOCK_TORCH = (
    NO_TORCH
    + """
from jointdistill.cli import app
try:
    app(prog_name='jointdistill')
finally:
    assert 'torch' not in sys.modules
"""
)


def _images(folder, prepared):
    folder.mkdir()
    images = np.load(prepared / "test" / "images.npy")
    for i in range(3):
        Image.fromarray(images[i]).save(folder / f"frame{i}.png")
    Image.fromarray(images[3]).resize((150, 70)).save(folder / "other_size.jpg", quality=95)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (folder / "notes.txt").write_text("not an image suffix: skipped")
    return images


def test_predict_without_torch_on_a_folder_with_a_corrupt_file(exported, prepared, tmp_path):
    root, _ = exported
    model = root / "export" / "student.onnx"
    images = _images(tmp_path / "in", prepared)
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCK_TORCH,
            "predict",
            str(model),
            str(tmp_path / "in"),
            "--out",
            str(tmp_path / "out"),
            "--batch-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr
    assert "broken.png: not a readable image" in r.stderr
    assert r.stderr.count("running on the CPU") == 1
    assert "predicted 4 of 5 images" in r.stdout
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    stems = ("frame0", "frame1", "frame2", "other_size")
    assert names == sorted(f"{s}.{k}.png" for s in stems for k in ("labels", "depth", "depth_color"))

    s = StudentSession(model, "cpu")
    labels, depth = s.predict([images[0]])[0]
    pic = Image.open(tmp_path / "out" / "frame0.labels.png")
    assert pic.mode == "P" and pic.getpalette()[:21] == [c for rgb in s.meta["palette"] for c in rgb]
    assert np.array_equal(np.asarray(pic), labels)
    mm = np.asarray(Image.open(tmp_path / "out" / "frame0.depth.png"))
    assert mm.dtype == np.uint16 and mm.shape == (48, 96)
    assert np.abs(mm.astype(np.float64) - np.clip(np.round(depth * 1000), 0, 65535)).max() <= 1
    other = Image.open(tmp_path / "out" / "other_size.labels.png")
    assert other.size == (150, 70) and np.asarray(other).max() < len(s.classes)
    assert Image.open(tmp_path / "out" / "other_size.depth_color.png").mode == "RGB"


def test_predict_refuses_a_bad_model_with_one_line(exported, tmp_path):
    from typer.testing import CliRunner

    from jointdistill.cli import app

    root, _ = exported
    (tmp_path / "img.png").write_bytes(b"")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    r = CliRunner().invoke(app, ["predict", str(junk), str(tmp_path / "img.png")])
    assert r.exit_code == 2 and "not a loadable ONNX model" in r.output
    plain = onnx.load(str(root / "export" / "student.onnx"))
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "plain.onnx"), str(tmp_path / "img.png")])
    assert r.exit_code == 2 and "not a jointdistill export" in r.output


def test_execution_provider_choice(exported, monkeypatch):
    root, _ = exported
    assert choose_providers("cpu") == (["CPUExecutionProvider"], None)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        providers, why = choose_providers("auto")
        assert providers == ["CPUExecutionProvider"] and "onnxruntime-gpu" in why
        with pytest.raises(ModelError, match="onnxruntime-gpu"):
            choose_providers("cuda")
    # With onnxruntime-gpu present, auto asks for CUDA first; with no usable GPU it still runs, on the CPU.
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert choose_providers("auto") == (["CUDAExecutionProvider", "CPUExecutionProvider"], None)
    s = StudentSession(root / "export" / "student.onnx", "auto")
    if s.provider != "CUDAExecutionProvider":
        assert s.provider == "CPUExecutionProvider" and "no usable GPU" in s.fallback_reason
