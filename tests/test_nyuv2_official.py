"""NYUv2's official files — the labelled MATLAB v7.3 .mat, splits.mat and a class-mapping file — written in
their real on-disk formats (HDF5 behind MATLAB's 512-byte header, column-major axes; MATLAB v5 via scipy)
and read through the real `prepare` stage, checked value by value."""

import h5py
import numpy as np
import pytest
import yaml
from scipy.io import savemat

from jointdistill.data.sources.nyuv2_mat import CLASSES_40, read_class_map
from jointdistill.errors import DataError
from jointdistill.stages import prepare

from .test_sources import _prepared_by_id, params

H, W, N = 16, 20, 7
TRAIN, TEST = [1, 3, 4, 6, 7], [2, 5]  # 1-based, as splits.mat stores them


def _matlab_header(path):
    """MATLAB's 128-byte text header inside the 512-byte HDF5 user block of a v7.3 file."""
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Wed Nov 25 12:00:00 2026 HDF5 schema 1.00 ."
    header = text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as f:
        f.write(header)


def _cell_of_strings(f, name, strings):
    refs = []
    for i, s in enumerate(strings):
        ds = f.create_dataset(f"#refs#/{name}{i}", data=np.frombuffer(s.encode("utf-16-le"), np.uint16)[:, None])
        ds.attrs["MATLAB_class"] = np.bytes_("char")
        refs.append(ds.ref)
    cell = f.create_dataset(name, data=np.array(refs, dtype=h5py.ref_dtype)[None, :])
    cell.attrs["MATLAB_class"] = np.bytes_("cell")


def write_labeled_mat(path, n=N, h=H, w=W, label_max=894):
    """The official layout: MATLAB (H, W, 3, N) / (H, W, N) arrays, which h5py sees axis-reversed."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    labels = rng.integers(0, label_max + 1, (n, h, w)).astype(np.uint16)
    labels[:, 0, :] = 0  # unlabeled
    depths = rng.uniform(0.7, 9.5, (n, h, w)).astype(np.float32)
    depths[:, 1, :2] = 0.0  # holes
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, arr, cls in (
            ("images", images.transpose(0, 3, 2, 1), "uint8"),
            ("labels", labels.transpose(0, 2, 1), "uint16"),
            ("depths", depths.transpose(0, 2, 1), "single"),
            ("rawDepths", depths.transpose(0, 2, 1), "single"),
        ):
            ds = f.create_dataset(name, data=arr, chunks=(1,) + arr.shape[1:])
            ds.attrs["MATLAB_class"] = np.bytes_(cls)
        _cell_of_strings(f, "names", [f"raw{i}" for i in range(1, 895)])
        _cell_of_strings(f, "sceneTypes", ["kitchen"] * n)
    _matlab_header(path)
    return images, labels, depths


def write_splits(path, train=TRAIN, test=TEST, v73=False):
    col = {"trainNdxs": np.array(train, np.float64)[:, None], "testNdxs": np.array(test, np.float64)[:, None]}
    if not v73:
        savemat(path, col)
        return
    with h5py.File(path, "w", userblock_size=512) as f:
        for k, v in col.items():
            f.create_dataset(k, data=v.T).attrs["MATLAB_class"] = np.bytes_("double")
    _matlab_header(path)


def class_map_40(seed=1):
    rng = np.random.default_rng(seed)
    mapping = rng.integers(1, 41, 894).astype(np.float64)
    mapping[[4, 9, 99]] = 0  # raw classes 5, 10, 100 stay unlabeled
    return mapping


def write_class_map_mat(path, mapping, names=CLASSES_40, v73=False):
    if not v73:  # as Gupta et al. ship classMapping40.mat
        savemat(path, {"mapClass": mapping[None, :], "className": np.array(list(names), dtype=object)[None, :]})
        return
    with h5py.File(path, "w", userblock_size=512) as f:  # a struct, as MATLAB -v7.3 saves one
        g = f.create_group("classMapping")
        g.attrs["MATLAB_class"] = np.bytes_("struct")
        g.create_dataset("mapClass", data=mapping[:, None]).attrs["MATLAB_class"] = np.bytes_("double")
    _matlab_header(path)


@pytest.fixture
def official(tmp_path):
    root = tmp_path / "nyu"
    root.mkdir()
    truth = write_labeled_mat(root / "nyu_depth_v2_labeled.mat")
    write_splits(root / "splits.mat")
    mapping = class_map_40()
    write_class_map_mat(tmp_path / "classMapping40.mat", mapping)
    return root, truth, mapping


def _extra(tmp_path, class_map="classMapping40.mat"):
    return (f"prepare.nyuv2_class_map={tmp_path / class_map}", f"prepare.height={H}", f"prepare.width={W}")


@pytest.mark.parametrize("root_is_file", [False, True])
def test_official_mat_value_by_value(tmp_path, official, root_is_file):
    root, (images, labels, depths), mapping = official
    p = params("nyuv2", root / "nyu_depth_v2_labeled.mat" if root_is_file else root, *_extra(tmp_path))
    meta = prepare.run(p, tmp_path / "out")
    assert meta["classes"] == list(CLASSES_40)
    assert meta["source"]["layout"].startswith("official labelled .mat")
    assert meta["counts"]["test"] == len(TEST) and meta["counts"]["train"] + meta["counts"]["val"] == len(TRAIN)
    found = _prepared_by_id(tmp_path / "out", meta)
    assert set(found) == {f"nyuv2/{i:04d}" for i in TRAIN + TEST}
    for i in TRAIN + TEST:
        split, image, label, depth = found[f"nyuv2/{i:04d}"]
        assert (split == "test") == (i in TEST)
        np.testing.assert_array_equal(image, images[i - 1])  # axes put back: (H, W, 3), not transposed
        raw = labels[i - 1].astype(np.int64)
        expected = np.where(
            raw == 0, 255, np.where(mapping[np.maximum(raw, 1) - 1] > 0, mapping[np.maximum(raw, 1) - 1] - 1, 255)
        )
        np.testing.assert_array_equal(label, expected.astype(np.uint8))
        np.testing.assert_array_equal(depth, depths[i - 1])
        assert (label[0] == 255).all() and (depth[1, :2] == 0).all()
    assert np.isin(labels[np.array(TRAIN + TEST) - 1], [5, 10, 100]).any()  # the unmapped raw ids occur


def test_class_map_formats_agree(tmp_path):
    mapping = class_map_40()
    write_class_map_mat(tmp_path / "v5.mat", mapping)
    write_class_map_mat(tmp_path / "v73.mat", mapping, v73=True)
    np.save(tmp_path / "map.npy", mapping.astype(np.int64))
    np.savetxt(tmp_path / "map.txt", mapping, fmt="%d")
    (tmp_path / "map.yaml").write_text(
        yaml.safe_dump({"classes": list(CLASSES_40), "map": {str(i + 1): int(v) for i, v in enumerate(mapping) if v}})
    )
    expected = np.concatenate([[255], np.where(mapping > 0, mapping - 1, 255)]).astype(np.uint8)
    for name in ("v5.mat", "v73.mat", "map.npy", "map.txt", "map.yaml"):
        lookup, classes, palette = read_class_map(tmp_path / name)
        np.testing.assert_array_equal(lookup, expected, err_msg=name)
        assert classes == CLASSES_40 and len(palette) == 40, name
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"classes": ["a"], "map": ["a"] * 894}))
    with pytest.raises(DataError, match=r"bad.yaml: map values must be numbers"):
        read_class_map(tmp_path / "bad.yaml")
    # 13 classes (classMapping13): default names and the 13-class palette of the preprocessed layout
    write_class_map_mat(tmp_path / "m13.mat", (mapping % 13) + 1, names=[f"c{i}" for i in range(13)])
    lookup, classes, _ = read_class_map(tmp_path / "m13.mat")
    assert classes[0] == "c0" and lookup[0] == 255 and lookup[1:].max() == 12


def test_splits_v73_and_a_yaml_class_map(tmp_path, official):
    root, (_, labels, _), _ = official
    write_splits(root / "splits.mat", train=[1, 2, 3, 4, 5], test=[6, 7], v73=True)
    (tmp_path / "map.yaml").write_text(
        yaml.safe_dump({"classes": ["low", {"name": "high", "color": [1, 2, 3]}], "map": [1] * 447 + [2] * 447})
    )
    meta = prepare.run(params("nyuv2", root, *_extra(tmp_path, "map.yaml")), tmp_path / "out")
    assert meta["classes"] == ["low", "high"] and meta["palette"][1] == [1, 2, 3]
    found = _prepared_by_id(tmp_path / "out", meta)
    split, _, label, _ = found["nyuv2/0007"]
    raw = labels[6].astype(np.int64)
    assert split == "test"
    np.testing.assert_array_equal(label, np.select([raw == 0, raw <= 447], [255, 0], 1))


def test_official_bad_inputs_name_the_file(tmp_path, official):
    root, _, mapping = official
    out = tmp_path / "out"
    with pytest.raises(DataError, match="set prepare.nyuv2_class_map"):
        prepare.run(params("nyuv2", root), out)
    ok = _extra(tmp_path)

    np.save(tmp_path / "short.npy", mapping[:893])
    with pytest.raises(DataError, match=r"short.npy: 893 values; expected one per raw class \(894\)"):
        prepare.run(params("nyuv2", root, *_extra(tmp_path, "short.npy")), out)

    write_splits(root / "splits.mat", train=[1, 2, 9], test=[4])
    with pytest.raises(DataError, match=r"splits.mat: trainNdxs must hold frame numbers 1..7"):
        prepare.run(params("nyuv2", root, *ok), out)
    write_splits(root / "splits.mat", train=[1, 2, 4], test=[4])
    with pytest.raises(DataError, match="share frames"):
        prepare.run(params("nyuv2", root, *ok), out)
    (root / "splits.mat").unlink()
    with pytest.raises(DataError, match=r"splits.mat: missing"):
        prepare.run(params("nyuv2", root, *ok), out)
    write_splits(root / "splits.mat")

    write_labeled_mat(root / "nyu_depth_v2_labeled.mat", label_max=900)
    with pytest.raises(DataError, match=r"labeled.mat: frame \d+: label id 9\d\d outside 0..894"):
        prepare.run(params("nyuv2", root, *ok), out)

    (root / "nyu_depth_v2_labeled.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))
    with pytest.raises(DataError, match=r"labeled.mat: not a MATLAB v7.3 \(HDF5\) file"):
        prepare.run(params("nyuv2", root, *ok), out)
    (tmp_path / "classMapping40.mat").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DataError, match=r"classMapping40.mat: unreadable .mat"):
        prepare.run(params("nyuv2", root, *ok), out)
    assert not out.exists()


def test_nearest_valid_depth_keeps_sparse_measurements():
    from jointdistill.data.resize import nearest_indices, nearest_valid

    rng = np.random.default_rng(0)
    depth = rng.uniform(1, 50, (64, 128)).astype(np.float32)
    holes = rng.random(depth.shape) < 0.6
    sparse = np.where(holes, 0, depth).astype(np.float32)
    out = nearest_valid(sparse, 16, 32)
    plain = sparse[np.ix_(nearest_indices(64, 16), nearest_indices(128, 32))]
    # where the nearest pixel is valid, the result is plain nearest; elsewhere a valid pixel of the 4×4
    # footprint fills in, so only footprints with no measurement at all stay invalid
    np.testing.assert_array_equal(out[plain > 0], plain[plain > 0])
    footprint_has_valid = (sparse.reshape(16, 4, 32, 4) > 0).any(axis=(1, 3))
    np.testing.assert_array_equal(out > 0, footprint_has_valid)
    blocks = sparse.reshape(16, 4, 32, 4).transpose(0, 2, 1, 3).reshape(16, 32, 16)
    assert all(out[r, c] in blocks[r, c] for r in range(16) for c in range(32))
    assert (out > 0).mean() > 0.95 > (plain > 0).mean()
    # one measurement in a footprint wins; of several, the one nearest the centre
    one = np.zeros((4, 4), np.float32)
    one[0, 3], one[2, 1] = 7.0, 3.0
    assert nearest_valid(one, 1, 1)[0, 0] == 3.0
    # enlarging stays plain nearest; no invented values anywhere
    doubled = np.repeat(np.repeat(sparse[:8, :8], 2, 0), 2, 1)
    np.testing.assert_array_equal(nearest_valid(sparse[:8, :8], 16, 16), doubled)
