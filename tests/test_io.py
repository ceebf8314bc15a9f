import os

import pytest

from jointdistill.io import atomic_dir, atomic_write_text, recover


def test_atomic_dir_replaces_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        assert tmp != out and tmp.parent == out.parent
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # untouched until the end
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_keeps_old_on_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("killed")
    assert (out / "old.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_recover_after_a_kill_mid_swap(tmp_path):
    # A run killed after moving the old output aside but before moving the new one in.
    old = tmp_path / ".out.old-123-abcd"
    old.mkdir()
    (old / "keep.txt").write_text("previous")
    stale = tmp_path / ".out.tmp-xyz"
    stale.mkdir()
    recover(tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "previous"
    assert not old.exists() and not stale.exists()


def test_atomic_write_text(tmp_path):
    p = tmp_path / "a" / "f.json"
    atomic_write_text(p, "1")
    atomic_write_text(p, "2")
    assert p.read_text() == "2"
    assert os.listdir(p.parent) == ["f.json"]


def test_npy_stream_writes_what_np_save_writes(tmp_path):
    import numpy as np

    from jointdistill.io import NpyStream

    rows = np.random.default_rng(0).random((5, 3, 4)).astype(np.float32)
    with NpyStream(tmp_path / "s.npy", rows.shape, np.float32) as s:
        for r in rows:
            s.append(r)
    np.save(tmp_path / "ref.npy", rows)
    assert (tmp_path / "s.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), rows)

    with pytest.raises(ValueError, match=r"row \(3, 5\), expected \(3, 4\)"):
        NpyStream(tmp_path / "bad.npy", (2, 3, 4), np.uint8).append(np.zeros((3, 5)))
    short = NpyStream(tmp_path / "short.npy", (2, 3), np.uint8)
    short.append(np.zeros(3))
    with pytest.raises(ValueError, match="1 of 2 rows written"):
        short.close()
    with pytest.raises(ValueError, match="more than 1 rows"), NpyStream(tmp_path / "x.npy", (1, 2), np.uint8) as s:
        s.append([1, 2])
        s.append([3, 4])
