"""Sensor-like train targets (prepare.sensor): only the train split changes, deterministically, the way a sensor
and an annotator would change it."""

import json

import numpy as np
import pandas as pd
import pytest

from jointdistill.config import load_params
from jointdistill.data.sensor import degrade, edge_mask
from jointdistill.stages import prepare

from .conftest import REPO, TINY


def _scene(h=64, w=128):
    depth = np.full((h, w), 40.0, np.float32)
    depth[:, w // 2 :] = 10.0  # a near object on the right half: one vertical discontinuity
    depth[:8] = 0.0  # sky: invalid
    label = np.zeros((h, w), np.uint8)
    label[:, w // 2 :] = 6
    label[:8] = 4
    label[-2:] = 255
    return depth, label


def test_degrade_is_deterministic_and_leaves_inputs_alone():
    depth, label = _scene()
    d0, l0 = depth.copy(), label.copy()
    a = degrade(depth, label, 0, "s-1", 0.05, 0.1, 2, 2, 255)
    b = degrade(depth, label, 0, "s-1", 0.05, 0.1, 2, 2, 255)
    c = degrade(depth, label, 0, "s-2", 0.05, 0.1, 2, 2, 255)
    assert np.array_equal(depth, d0) and np.array_equal(label, l0)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_depth_noise_grows_with_distance_and_keeps_invalid_pixels_invalid():
    depth, label = _scene(128, 256)
    noisy, _ = degrade(depth, label, 0, "s", 0.05, 0.0, 0, 0, 255)
    assert (noisy[:8] == 0).all() and (noisy[8:] > 0).all()
    rel = np.log(noisy[8:] / depth[8:])
    far, near = rel[:, :100].std(), rel[:, 156:].std()
    assert 0.02 < far < 0.08  # 0.05 · 40/50 = 4 % nominal
    assert near < 0.5 * far  # 10 m: a quarter of the far side's


def test_holes_cover_the_asked_share_plus_the_occlusion_edge():
    depth, label = _scene(128, 256)
    holed, _ = degrade(depth, label, 0, "s", 0.0, 0.1, 0, 0, 255)
    lost = (holed == 0) & (depth > 0)
    assert 0.07 < lost.sum() / (depth > 0).sum() < 0.13
    edge = edge_mask(depth, 2)
    assert edge[8:, 126:130].all() and not edge[:, :120].any() and not edge[:8].any()
    holed, _ = degrade(depth, label, 0, "s", 0.0, 0.0, 2, 0, 255)
    assert ((holed == 0) & (depth > 0)).sum() == edge.sum()


def test_label_jitter_moves_boundaries_only_and_keeps_ignore():
    depth, label = _scene(128, 256)
    _, jittered = degrade(depth, label, 0, "s", 0.0, 0.0, 0, 3, 255)
    changed = jittered != label
    assert changed.any()
    ys, xs = np.nonzero(changed)
    near_vertical = np.abs(xs - 128) <= 3
    near_horizontal = np.abs(ys - 8) <= 3
    near_bottom = ys >= 128 - 2 - 3
    assert (near_vertical | near_horizontal | near_bottom).all()
    assert (jittered[label == 255] == 255).all()


@pytest.fixture(scope="module")
def sensor_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("sensor")
    exact = load_params(REPO / "params.yaml", [*TINY, "prepare.sensor.enabled=false"])
    noisy = load_params(REPO / "params.yaml", [*TINY, "prepare.sensor.enabled=true"])
    prepare.run(exact, root / "exact")
    prepare.run(noisy, root / "noisy")
    return root / "exact", root / "noisy"


def test_prepare_degrades_the_paid_labels_and_keeps_test_exact(sensor_pair):
    # Train and val labels come from the user's sensor and annotators; test is the benchmark's exact measure.
    exact, noisy = sensor_pair
    for name in ("images", "labels", "depth"):
        assert np.array_equal(np.load(exact / "test" / f"{name}.npy"), np.load(noisy / "test" / f"{name}.npy"))
    for split in ("train", "val"):
        assert np.array_equal(np.load(exact / split / "images.npy"), np.load(noisy / split / "images.npy"))
        d_e, d_n = np.load(exact / split / "depth.npy"), np.load(noisy / split / "depth.npy")
        assert ((d_n == 0) & (d_e > 0)).sum() > 0.05 * (d_e > 0).sum(), split
        assert not np.array_equal(np.load(exact / split / "labels.npy"), np.load(noisy / split / "labels.npy"))
    meta_e, meta_n = (json.loads((p / "meta.json").read_text()) for p in sensor_pair)
    assert meta_e["train_targets"] == "as the source gives them"
    assert meta_n["train_targets"]["sensor"]["enabled"] is True
    assert meta_e["source_checksum"] != meta_n["source_checksum"]


def test_a_real_source_keeps_its_own_targets(tmp_path):
    """prepare.sensor is on by default; a real dataset's targets already come from a sensor and are left alone
    (test_sources checks them value by value under the same default)."""
    from .test_sources import make_folder, params

    truth = make_folder(tmp_path / "src")
    p = params("folder", tmp_path / "src")
    assert p.prepare.sensor.enabled
    meta = prepare.run(p, tmp_path / "out")
    assert meta["train_targets"] == "as the source gives them"
    ids = pd.read_parquet(tmp_path / "out" / "manifest.parquet").query("split == 'train'")["sample_id"].tolist()
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "train" / "labels.npy")[0], truth[ids[0]][1])
