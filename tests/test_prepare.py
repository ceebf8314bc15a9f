import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from jointdistill.config import load_params
from jointdistill.data.contract import SPLITS, verify_prepared
from jointdistill.data.sample import Sample, SampleRef
from jointdistill.data.sources.street_scenes import CLASSES, PALETTE
from jointdistill.errors import DataError, OutputError
from jointdistill.stages import prepare

from .conftest import REPO, TINY


def test_contract(prepared, tiny_params):
    meta = verify_prepared(prepared, check_digests=True)
    assert meta["dataset"] == "synthetic"
    assert meta["classes"] == list(CLASSES) and meta["palette"] == [list(c) for c in PALETTE]
    assert meta["ignore_index"] == 255 and meta["depth_unit"] == "m"
    assert meta["resolution"] == [48, 96]
    assert len(meta["normalization"]["mean"]) == 3 and len(meta["normalization"]["std"]) == 3
    counts = meta["counts"]
    assert sum(counts.values()) == 40 and min(counts[s] for s in SPLITS) >= 1 and counts["unlabelled"] == 0
    for split in SPLITS:
        n = counts[split]
        images = np.load(prepared / split / "images.npy")
        labels = np.load(prepared / split / "labels.npy")
        depth = np.load(prepared / split / "depth.npy")
        assert images.shape == (n, 48, 96, 3) and images.dtype == np.uint8
        assert labels.shape == (n, 48, 96) and labels.dtype == np.uint8
        assert depth.shape == (n, 48, 96) and depth.dtype == np.float32
        assert set(np.unique(labels)) <= set(range(7)) | {255}
        assert np.isfinite(depth).all() and depth.min() >= 0
        assert meta["class_pixels"][split] == np.bincount(labels.ravel(), minlength=7)[:7].tolist()
    # every class is present in train
    assert all(c > 0 for c in meta["class_pixels"]["train"])
    manifest = pd.read_parquet(prepared / "manifest.parquet")
    assert list(manifest.columns) == ["sample_id", "split", "index", "source_split", "source_paths", "sha256"]
    assert manifest["sample_id"].is_unique and len(manifest) == 40
    assert (manifest.loc[manifest["split"] == "test", "source_split"] == "test").all()
    assert (manifest.loc[manifest["split"] != "test", "source_split"] == "train").all()
    assert meta["masked_depth_pixels"]["total"] == 0
    assert meta["params_digest"] == tiny_params.digest("prepare")
    gallery = Image.open(prepared / "gallery.png")
    assert gallery.width == 3 * 96 and gallery.height >= 2 * 48


def test_val_split_matches_hash_rule(prepared, tiny_params):
    from jointdistill.data.split import hash_fraction

    manifest = pd.read_parquet(prepared / "manifest.parquet")
    pool = manifest[manifest["source_split"] == "train"]
    expect_val = pool["sample_id"].map(lambda s: hash_fraction(s, tiny_params.seed, "val") < 0.15)
    assert (expect_val == (pool["split"] == "val")).all()


def test_deterministic(prepared, tiny_params, tmp_path):
    again = tmp_path / "again"
    prepare.run(tiny_params, again)
    a, b = json.loads((prepared / "meta.json").read_text()), json.loads((again / "meta.json").read_text())
    assert a["source_checksum"] == b["source_checksum"]
    for split in SPLITS:
        for name in ("images", "labels", "depth"):
            np.testing.assert_array_equal(
                np.load(prepared / split / f"{name}.npy"), np.load(again / split / f"{name}.npy")
            )


def test_dataset_normalisation_is_measured_when_asked(tmp_path):
    p = load_params(REPO / "params.yaml", [*TINY, "prepare.normalization=dataset", "prepare.gallery_images=0"])
    meta = prepare.run(p, tmp_path / "out")
    images = np.load(tmp_path / "out" / "train" / "images.npy") / 255.0
    np.testing.assert_allclose(meta["normalization"]["mean"], images.reshape(-1, 3).mean(0), atol=1e-5)
    np.testing.assert_allclose(meta["normalization"]["std"], images.reshape(-1, 3).std(0), atol=1e-5)
    assert not (tmp_path / "out" / "gallery.png").exists()


class CraftedSource:
    """A source whose samples the test controls, standing in for a real adapter."""

    name = "crafted"
    classes = CLASSES
    palette = PALETTE
    ignore_index = 255

    def __init__(self, n=30, broken=None, nan_in=None, size=(24, 32)):
        self.n, self.broken, self.nan_in, self.size = n, broken, nan_in, size

    def list(self):
        return [
            SampleRef(f"c{i:03d}", "test" if i % 4 == 0 else "train", (f"/data/c{i:03d}.png",)) for i in range(self.n)
        ]

    def load(self, ref):
        i = int(ref.sample_id[1:])
        h, w = self.size
        rng = np.random.default_rng(i)
        s = Sample(
            ref.sample_id,
            rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
            rng.integers(0, 7, (h, w)).astype(np.uint8),
            rng.uniform(1, 50, (h, w)).astype(np.float32),
        )
        if self.nan_in is not None and i in self.nan_in:
            s.depth[:2, :3] = np.nan
        if self.broken is not None and i == self.broken:
            s.label = s.label[:-1]
        return s

    def describe(self):
        return {"crafted": True}


@pytest.fixture
def use_source(monkeypatch):
    def install(source):
        monkeypatch.setattr(prepare, "make_source", lambda params, seed: source)

    return install


def test_native_resolution_is_resized(use_source, tiny_params, tmp_path):
    use_source(CraftedSource(size=(96, 192)))
    meta = prepare.run(tiny_params, tmp_path / "out")
    assert meta["resolution"] == [48, 96]
    assert np.load(tmp_path / "out" / "train" / "labels.npy").shape[1:] == (48, 96)


def test_masked_depth_is_reported(use_source, tiny_params, tmp_path):
    use_source(CraftedSource(nan_in={1, 2}))
    meta = prepare.run(tiny_params, tmp_path / "out")
    masked = meta["masked_depth_pixels"]
    assert masked["nan"] == 12 and masked["samples_affected"] == 2
    assert set(masked["first_samples"]) == {"c001", "c002"}


def test_failed_run_leaves_previous_output_untouched(use_source, tiny_params, tmp_path):
    out = tmp_path / "out"
    use_source(CraftedSource())
    prepare.run(tiny_params, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    use_source(CraftedSource(broken=17))
    with pytest.raises(DataError, match=r"sample c017: sizes differ"):
        prepare.run(tiny_params, out)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dirs left behind


def test_empty_source(use_source, tiny_params, tmp_path):
    use_source(CraftedSource(n=0))
    with pytest.raises(DataError, match="the source lists no samples"):
        prepare.run(tiny_params, tmp_path / "out")


def test_too_few_samples_for_a_split(use_source, tiny_params, tmp_path):
    use_source(CraftedSource(n=2))
    with pytest.raises(DataError, match="would be empty"):
        prepare.run(tiny_params, tmp_path / "out")


def test_unwritable_output(tiny_params, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write to"):
        prepare.run(tiny_params, blocker / "prepared")


def test_every_dataset_has_an_adapter_and_an_unknown_one_is_a_clear_error(tiny_params):
    from typing import get_args

    from jointdistill.config import PrepareParams
    from jointdistill.data.sources import make_source, registry
    from jointdistill.errors import ConfigError

    make_source(tiny_params.prepare, 0)
    assert set(get_args(PrepareParams.model_fields["dataset"].annotation)) == set(registry._REGISTRY)
    bogus = PrepareParams.model_construct(**{**tiny_params.prepare.model_dump(), "dataset": "kitti"})
    with pytest.raises(ConfigError, match=r"'kitti' adapter is not available .*cityscapes, folder, nyuv2, synthetic"):
        make_source(bogus, 0)


@pytest.mark.slow
def test_sigkill_mid_run_keeps_previous_output_and_next_run_recovers(prepared, tmp_path):
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    shutil.copytree(prepared, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jointdistill",
            "prepare",
            "--params",
            str(REPO / "params.yaml"),
            "--set",
            "prepare.num_samples=20000",
            "--out",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.tmp-*/train/images.npy")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # well inside the streaming loop
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert list(tmp_path.glob(".out.tmp-*")), "the killed run should have been writing to a temporary folder"
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after
    verify_prepared(out, check_digests=True)
    # The next run cleans up what the killed one left and replaces the output.
    p = load_params(REPO / "params.yaml", [*TINY, "prepare.height=32"])
    prepare.run(p, out)
    assert verify_prepared(out)["resolution"] == [32, 96]
    assert [x.name for x in tmp_path.iterdir()] == ["out"]
