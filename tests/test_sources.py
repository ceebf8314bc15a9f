"""Real-data adapters (`folder`, NYUv2 preprocessed) through the real `prepare` stage, on fixtures written in
their on-disk formats, checked value by value."""

import json
import zlib

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from jointdistill.config import load_params
from jointdistill.data.contract import open_split, verify_prepared
from jointdistill.errors import DataError
from jointdistill.stages import prepare

from .conftest import REPO


def params(dataset, root, *extra):
    return load_params(
        REPO / "params.yaml",
        [
            f"prepare.dataset={dataset}",
            f"prepare.root={root}",
            "prepare.height=16",
            "prepare.width=24",
            "prepare.gallery_images=0",
            *extra,
        ],
    )


def _scene(i, h=16, w=24):
    rng = np.random.default_rng(i)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = (np.arange(h * w).reshape(h, w) + i) % 3
    label[0, :] = 255  # unlabeled row
    depth_mm = rng.integers(500, 20000, (h, w)).astype(np.uint16)
    depth_mm[1, :3] = 0  # no depth there
    return image, label.astype(np.uint8), depth_mm


def make_folder(root, n_train=8, n_test=3, npy_depth_for=()):
    root.mkdir(exist_ok=True)
    (root / "classes.yaml").write_text(
        yaml.safe_dump({"classes": ["road", {"name": "car", "color": [0, 0, 142]}, "sky"], "ignore_index": 255})
    )
    truth = {}
    for split, n in (("train", n_train), ("test", n_test)):
        if not n:
            continue
        for sub in ("images", "labels", "depth"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            stem = f"{split}{i:02d}"
            image, label, depth_mm = _scene(zlib.crc32(stem.encode()))
            Image.fromarray(image).save(root / split / "images" / f"{stem}.png")
            Image.fromarray(label).save(root / split / "labels" / f"{stem}.png")
            if stem in npy_depth_for:
                np.save(root / split / "depth" / f"{stem}.npy", depth_mm.astype(np.float32) / 1000)
            else:
                Image.fromarray(depth_mm).save(root / split / "depth" / f"{stem}.png")  # 16-bit PNG
            truth[f"{split}/{stem}"] = (image, label, depth_mm.astype(np.float32) / 1000)
    return truth


def _prepared_by_id(out, meta):
    import pandas as pd

    manifest = pd.read_parquet(out / "manifest.parquet")
    found = {}
    for split in ("train", "val", "test"):
        arrays = open_split(out, split, meta)
        for row in manifest[manifest["split"] == split].itertuples():
            found[row.sample_id] = (
                split,
                arrays["images"][row.index],
                arrays["labels"][row.index],
                arrays["depth"][row.index],
            )
    return found


def test_folder_source_value_by_value(tmp_path):
    truth = make_folder(tmp_path / "src", npy_depth_for=("train03",))
    meta = prepare.run(params("folder", tmp_path / "src"), tmp_path / "out")
    assert meta["classes"] == ["road", "car", "sky"] and meta["palette"][1] == [0, 0, 142]
    assert meta["counts"]["test"] == 3 and meta["counts"]["train"] + meta["counts"]["val"] == 8
    verify_prepared(tmp_path / "out", check_digests=True)
    found = _prepared_by_id(tmp_path / "out", meta)
    assert set(found) == set(truth)
    for sid, (image, label, depth) in truth.items():
        split, p_image, p_label, p_depth = found[sid]
        assert (split == "test") == sid.startswith("test/")
        np.testing.assert_array_equal(p_image, image)  # same size: stored as read
        np.testing.assert_array_equal(p_label, label)  # 255 stays the ignore id
        np.testing.assert_allclose(p_depth, depth, rtol=1e-6)  # mm → m, 0 stays invalid
        assert (p_depth[1, :3] == 0).all()


def test_folder_source_bad_inputs_name_the_file(tmp_path):
    root = tmp_path / "src"
    make_folder(root, n_train=4, n_test=0)
    (root / "train" / "labels" / "train01.png").unlink()
    with pytest.raises(DataError, match=r"train01.png: no label file"):
        prepare.run(params("folder", root), tmp_path / "out")
    make_folder(root, n_train=4, n_test=0)
    Image.fromarray(np.full((16, 24), 7, np.uint8)).save(root / "train" / "labels" / "train02.png")
    with pytest.raises(DataError, match="train/train02"):  # class id 7 outside road, car, sky
        prepare.run(params("folder", root), tmp_path / "out")
    make_folder(root, n_train=4, n_test=0)
    Image.fromarray(np.zeros((10, 24), np.uint16)).save(root / "train" / "depth" / "train00.png")
    with pytest.raises(DataError, match=r"train00.png: depth is 24×10, its image train00.png is 24×16"):
        prepare.run(params("folder", root), tmp_path / "out")
    make_folder(root, n_train=4, n_test=0)
    (root / "train" / "images" / "train03.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="train03.png: unreadable image"):
        prepare.run(params("folder", root), tmp_path / "out")
    (root / "classes.yaml").write_text("classes: []")
    with pytest.raises(DataError, match="classes.yaml: expected a non-empty list"):
        prepare.run(params("folder", root), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_without_a_test_split_takes_one_from_train(tmp_path):
    make_folder(tmp_path / "src", n_train=20, n_test=0)
    meta = prepare.run(params("folder", tmp_path / "src", "prepare.test_fraction=0.3"), tmp_path / "out")
    assert sum(meta["counts"].values()) == 20 and meta["counts"]["test"] >= 1


def test_a_real_source_keeps_every_label_and_its_raw_frames_form_the_pool(tmp_path):
    """The shipped params.yaml runs the synthetic benchmark under a label budget; a user's own data keeps every
    label, and the pool of frames without labels is their raw footage (``raw/``), never their labels dropped."""
    assert load_params(REPO / "params.yaml").prepare.budget.seg < 1  # the benchmark's budget is on
    make_folder(tmp_path / "src", n_train=12, n_test=3)
    meta = prepare.run(params("folder", tmp_path / "src"), tmp_path / "all")
    c = meta["counts"]
    assert c["train"] + c["val"] == 12 and c["unlabelled"] == 0
    assert meta["labelled"]["train"] == {"seg": c["train"], "depth": c["train"], "all": c["train"]}
    assert meta["budget"] == "every label of the source"
    (tmp_path / "src" / "raw").mkdir()
    raw = {}
    for i in range(5):
        image, _, _ = _scene(1000 + i)
        Image.fromarray(image).save(tmp_path / "src" / "raw" / f"clip{i:02d}.png")
        raw[f"raw/clip{i:02d}"] = image
    meta = prepare.run(params("folder", tmp_path / "src"), tmp_path / "out")
    assert meta["counts"]["unlabelled"] == 5
    assert {k: meta["counts"][k] for k in ("train", "val", "test")} == {k: c[k] for k in ("train", "val", "test")}
    verify_prepared(tmp_path / "out", check_digests=True)
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    rows = manifest[manifest["split"] == "unlabelled"].sort_values("index")
    assert list(rows["sample_id"]) == sorted(raw)
    images = np.load(tmp_path / "out" / "unlabelled" / "images.npy")
    for i, sid in enumerate(rows["sample_id"]):
        np.testing.assert_array_equal(images[i], raw[sid])


def make_nyuv2(root, n_train=6, n_val=2, h=16, w=24):
    truth = {}
    for folder, n in (("train", n_train), ("val", n_val)):
        for part in ("image", "label", "depth"):
            (root / folder / part).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng(100 * (folder == "val") + i)
            image = rng.random((h, w, 3)).astype(np.float32)
            label = rng.integers(-1, 13, (h, w)).astype(np.float32)  # -1 = unlabeled, as MTAN stores it
            depth = rng.uniform(0.5, 9.0, (h, w, 1)).astype(np.float32)
            depth[0, 0, 0] = 0.0
            for part, arr in (("image", image), ("label", label), ("depth", depth)):
                np.save(root / folder / part / f"{i}.npy", arr)
            truth[f"nyuv2/{folder}/{i}"] = (image, label, depth[..., 0])
    return truth


def test_nyuv2_preprocessed_layout_value_by_value(tmp_path):
    truth = make_nyuv2(tmp_path / "nyu")
    p = params("nyuv2", tmp_path / "nyu")  # with the shipped synthetic budget: a real source keeps every label
    meta = prepare.run(p, tmp_path / "out")
    assert meta["counts"]["unlabelled"] == 0
    assert meta["labelled"]["train"]["seg"] == meta["labelled"]["train"]["depth"] == meta["counts"]["train"]
    assert len(meta["classes"]) == 13 and meta["classes"][0] == "bed" and meta["classes"][-1] == "window"
    assert meta["counts"]["test"] == 2 and meta["counts"]["train"] + meta["counts"]["val"] == 6
    found = _prepared_by_id(tmp_path / "out", meta)
    for sid, (image, label, depth) in truth.items():
        split, p_image, p_label, p_depth = found[sid]
        assert (split == "test") == ("/val/" in sid)  # the layout's val folder is the official test split
        np.testing.assert_array_equal(p_image, np.round(image * 255).astype(np.uint8))
        expected = np.where(label < 0, 255, label).astype(np.uint8)
        np.testing.assert_array_equal(p_label, expected)
        np.testing.assert_allclose(p_depth, depth, rtol=1e-6)
        assert p_depth[0, 0] == 0


def test_nyuv2_missing_partner_and_bad_values(tmp_path):
    make_nyuv2(tmp_path / "nyu")
    (tmp_path / "nyu" / "train" / "depth" / "3.npy").unlink()
    p = params("nyuv2", tmp_path / "nyu")
    with pytest.raises(DataError, match=r"image/3.npy: no partner .*depth/3.npy"):
        prepare.run(p, tmp_path / "out")
    make_nyuv2(tmp_path / "nyu")
    np.save(tmp_path / "nyu" / "train" / "image" / "2.npy", np.full((16, 24, 3), 3.0, np.float32))
    with pytest.raises(DataError, match=r"image/2.npy: float image values outside \[0, 1\]"):
        prepare.run(p, tmp_path / "out")
    with pytest.raises(DataError, match="expected the preprocessed NYUv2 layout"):
        prepare.run(params("nyuv2", tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


BASELINE, FX = 0.209313, 2262.52


def make_cityscapes(root, n_train=5, n_val=2, h=16, w=24):
    """Official names and formats: 8-bit labelIds PNG, 16-bit disparity PNG, camera JSON per frame."""
    truth = {}
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            city = "aachen" if split == "train" else "frankfurt"
            stem = f"{city}_{i:06d}_000019"
            rng = np.random.default_rng(i + 50 * (split == "val"))
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            ids = rng.integers(0, 34, (h, w)).astype(np.uint8)
            disparity = rng.integers(0, 30000, (h, w)).astype(np.uint16)
            disparity[0, :4] = [0, 1, 2, 257]  # invalid, invalid, tiny, exactly 1 px of disparity
            for sub, name, data in (
                ("leftImg8bit", "leftImg8bit.png", image),
                ("gtFine", "gtFine_labelIds.png", ids),
                ("disparity", "disparity.png", disparity),
            ):
                folder = root / sub / split / city
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(data).save(folder / f"{stem}_{name}")
            (root / "camera" / split / city).mkdir(parents=True, exist_ok=True)
            (root / "camera" / split / city / f"{stem}_camera.json").write_text(
                json.dumps(
                    {
                        "extrinsic": {"baseline": BASELINE, "pitch": 0.038, "x": 1.7, "y": 0.1, "z": 1.18},
                        "intrinsic": {"fx": FX, "fy": 2225.5, "u0": 1096.98, "v0": 513.137},
                    }
                )
            )
            truth[f"cityscapes/{split}/{stem}"] = (image, ids, disparity)
    return truth


@pytest.mark.parametrize("n_classes", [7, 19])
def test_cityscapes_value_by_value(tmp_path, n_classes):
    from jointdistill.data.sources.cityscapes import LABELS

    truth = make_cityscapes(tmp_path / "cs")
    p = params("cityscapes", tmp_path / "cs", f"prepare.cityscapes_classes={n_classes}", "prepare.max_depth=1000000")
    meta = prepare.run(p, tmp_path / "out")
    assert len(meta["classes"]) == n_classes
    assert meta["counts"]["test"] == 2 and meta["counts"]["train"] + meta["counts"]["val"] == 5
    found = _prepared_by_id(tmp_path / "out", meta)
    for sid, (image, ids, disparity) in truth.items():
        split, p_image, p_label, p_depth = found[sid]
        assert (split == "test") == ("/val/" in sid)
        np.testing.assert_array_equal(p_image, image)
        for label_id, (name, train_id, category) in LABELS.items():
            where = ids == label_id
            want = train_id if n_classes == 19 else (category - 1 if category else 255)
            assert (p_label[where] == want).all(), (name, label_id)
        car = meta["classes"].index("car" if n_classes == 19 else "vehicle")
        assert (ids == 26).any() and (p_label[ids == 26] == car).all()
        valid = disparity > 1
        expected = np.zeros(disparity.shape, np.float64)
        expected[valid] = BASELINE * FX / ((disparity[valid].astype(np.float64) - 1) / 256)
        np.testing.assert_allclose(p_depth, expected, rtol=1e-5)
        assert p_depth[0, 0] == 0 and p_depth[0, 1] == 0
        assert p_depth[0, 3] == pytest.approx(BASELINE * FX, rel=1e-5)  # p = 257 → 1 px of disparity


def test_cityscapes_train_extra_frames_are_depth_only(tmp_path):
    """train_extra's disparity is depth; its coarse labels are not fine labels, so its frames carry no seg label."""
    make_cityscapes(tmp_path / "cs")
    extra = {}
    for i in range(4):
        city, stem = "bremen", f"bremen_{i:06d}_000019"
        rng = np.random.default_rng(900 + i)
        image = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
        disparity = rng.integers(300, 30000, (16, 24)).astype(np.uint16)
        for sub, name, data in (("leftImg8bit", "leftImg8bit.png", image), ("disparity", "disparity.png", disparity)):
            folder = tmp_path / "cs" / sub / "train_extra" / city
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(data).save(folder / f"{stem}_{name}")
        cam = tmp_path / "cs" / "camera" / "train_extra" / city
        cam.mkdir(parents=True, exist_ok=True)
        (cam / f"{stem}_camera.json").write_text(
            json.dumps({"extrinsic": {"baseline": BASELINE}, "intrinsic": {"fx": FX}})
        )
        gt = tmp_path / "cs" / "gtCoarse" / "train_extra" / city  # coarse labels exist, and are not read
        gt.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 24), 26, np.uint8)).save(gt / f"{stem}_gtCoarse_labelIds.png")
        extra[f"cityscapes/train_extra/{stem}"] = disparity
    meta = prepare.run(params("cityscapes", tmp_path / "cs", "prepare.max_depth=1000000"), tmp_path / "out")
    lab = meta["labelled"]
    assert meta["counts"]["train"] + meta["counts"]["val"] == 9 and meta["counts"]["unlabelled"] == 0
    assert lab["train"]["seg"] + lab["val"]["seg"] == 5 and lab["train"]["depth"] + lab["val"]["depth"] == 9
    found = _prepared_by_id(tmp_path / "out", meta)
    for sid, disparity in extra.items():
        split, _, p_label, p_depth = found[sid]
        assert split in ("train", "val") and (p_label == 255).all()
        np.testing.assert_allclose(p_depth, BASELINE * FX / ((disparity.astype(np.float64) - 1) / 256), rtol=1e-5)


def test_cityscapes_missing_partner_and_bad_camera(tmp_path):
    make_cityscapes(tmp_path / "cs")
    cam = next((tmp_path / "cs" / "camera" / "train").glob("*/*_camera.json"))
    cam.write_text(json.dumps({"intrinsic": {"fx": FX}}))
    with pytest.raises(DataError, match="camera.json: unreadable camera file"):
        prepare.run(params("cityscapes", tmp_path / "cs"), tmp_path / "out")
    disp = next((tmp_path / "cs" / "disparity" / "val").glob("*/*_disparity.png"))
    disp.unlink()
    with pytest.raises(DataError, match="leftImg8bit.png: no partner file .*_disparity.png"):
        prepare.run(params("cityscapes", tmp_path / "cs"), tmp_path / "out")
    with pytest.raises(DataError, match="expected the official Cityscapes layout"):
        prepare.run(params("cityscapes", tmp_path / "nowhere"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
