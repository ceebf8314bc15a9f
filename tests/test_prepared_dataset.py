import json

import numpy as np
import pytest
import torch

from jointdistill.data.contract import open_split, read_meta, verify_prepared
from jointdistill.data.prepared import PreparedDataset
from jointdistill.data.transforms import JointTransform
from jointdistill.errors import DataError


def test_items(prepared):
    ds = PreparedDataset(prepared, "train")
    meta = read_meta(prepared)
    assert len(ds) == meta["counts"]["train"]
    item = ds[0]
    assert item["image"].shape == (3, 48, 96) and item["image"].dtype == torch.float32
    assert item["label"].shape == (48, 96) and item["label"].dtype == torch.int64
    assert item["depth"].shape == (1, 48, 96) and item["depth"].dtype == torch.float32
    raw = np.load(prepared / "train" / "images.npy")[0]
    mean, std = np.array(meta["normalization"]["mean"]), np.array(meta["normalization"]["std"])
    expect = (raw / 255.0 - mean) / std
    np.testing.assert_allclose(item["image"].permute(1, 2, 0).numpy(), expect, atol=1e-5)
    with pytest.raises(IndexError):
        ds[len(ds)]


def make_consistent(h=32, w=48):
    """Image, labels and depth that encode each other, so any misalignment is visible."""
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 7, (h // 4, w // 4), generator=g).repeat_interleave(4, 0).repeat_interleave(4, 1)
    image = torch.stack([label.float() * 10, label.float() * -3, torch.zeros(h, w)])
    depth = (label.float() + 1).unsqueeze(0)
    return image, label, depth


def test_crop_and_flip_are_joint():
    image, label, depth = make_consistent()
    t = JointTransform(crop=(24, 40), scale=(1.0, 1.0), hflip=True)
    flips = 0
    for seed in range(20):
        im, lb, d = t(image, label, depth, torch.Generator().manual_seed(seed))
        assert im.shape == (3, 24, 40) and lb.shape == (24, 40) and d.shape == (1, 24, 40)
        torch.testing.assert_close(im[0], lb.float() * 10)
        torch.testing.assert_close(d[0], lb.float() + 1)
        flips += int(
            not torch.equal(
                im, t.__class__(crop=(24, 40), hflip=False)(image, label, depth, torch.Generator().manual_seed(seed))[0]
            )
        )
    assert 3 < flips < 17


def test_scale_resizes_jointly_and_divides_depth():
    image, label, depth = make_consistent()
    t = JointTransform(crop=(32, 48), scale=(2.0, 2.0), hflip=False)
    im, lb, d = t(image, label, depth, torch.Generator().manual_seed(1))
    assert set(lb.unique().tolist()) <= set(range(7))
    torch.testing.assert_close(d[0], (lb.float() + 1) / 2.0)


def test_shrinking_pads_with_ignore_and_invalid_depth():
    image, label, depth = make_consistent()
    t = JointTransform(crop=(32, 48), scale=(0.5, 0.5), hflip=False)
    im, lb, d = t(image, label, depth, torch.Generator().manual_seed(1))
    assert (lb == 255).sum() == 32 * 48 - 16 * 24
    assert ((lb == 255) == (d[0] == 0)).all()
    valid = lb != 255
    torch.testing.assert_close(d[0][valid], (lb[valid].float() + 1) * 2.0)


def test_augmentation_is_fixed_by_seed_epoch_index(prepared):
    t = JointTransform(crop=(40, 80), scale=(0.75, 1.5))
    a = PreparedDataset(prepared, "train", t, seed=5)
    b = PreparedDataset(prepared, "train", t, seed=5)
    torch.testing.assert_close(a[3]["image"], b[3]["image"])
    a.set_epoch(1)
    assert not torch.equal(a[3]["image"], b[3]["image"])
    b.set_epoch(1)
    torch.testing.assert_close(a[3]["depth"], b[3]["depth"])


def test_dataloader_batches(prepared):
    t = JointTransform(crop=(40, 80), scale=(0.75, 1.25))
    loader = torch.utils.data.DataLoader(PreparedDataset(prepared, "train", t), batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 40, 80) and batch["label"].shape == (4, 40, 80)


@pytest.fixture
def copy(prepared, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(prepared, dst)
    return dst


def test_missing_meta(copy):
    (copy / "meta.json").unlink()
    with pytest.raises(DataError, match="meta.json: missing"):
        PreparedDataset(copy, "train")


def test_corrupt_meta(copy):
    (copy / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt JSON"):
        read_meta(copy)


def test_truncated_array(copy):
    path = copy / "val" / "depth.npy"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="val/depth.npy: not a readable .npy file"):
        open_split(copy, "val")


def test_wrong_shape_array(copy):
    meta = json.loads((copy / "meta.json").read_text())
    np.save(copy / "test" / "labels.npy", np.zeros((meta["counts"]["test"], 5, 5), np.uint8))
    with pytest.raises(DataError, match=r"test/labels.npy: expected uint8"):
        open_split(copy, "test")


def test_tampered_sample_fails_checksum(copy):
    arr = np.load(copy / "train" / "labels.npy")
    arr[0, 0, 0] = (arr[0, 0, 0] + 1) % 7
    np.save(copy / "train" / "labels.npy", arr)
    verify_prepared(copy, check_files=False)  # shapes still fine
    with pytest.raises(DataError, match="does not match its manifest checksum"):
        verify_prepared(copy, check_digests=True, check_files=False)
    # Same size, other bytes: the per-file checksums prepare recorded catch it, naming the file.
    with pytest.raises(DataError, match=r"train/labels\.npy: its content differs from what prepare recorded"):
        verify_prepared(copy)


def test_same_size_corruption_stops_a_stage_before_training(copy, tmp_path):
    """One flipped byte in place (same size, still a valid .npy): the teacher stage refuses the data before any
    training, names the file, and writes nothing."""
    from jointdistill.config import params_from_dict
    from jointdistill.stages import teacher

    path = copy / "val" / "depth.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"val/depth\.npy: its content differs"):
        teacher.run(params_from_dict({}), "seg", copy, tmp_path / "teacher")
    assert not (tmp_path / "teacher").exists()
    (copy / "checksums.json").unlink()
    with pytest.raises(DataError, match="checksums.json: missing"):
        verify_prepared(copy)
