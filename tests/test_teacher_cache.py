"""The teacher-output cache: augmentation applied identically to cached maps, the cache's content, its reuse
and rebuild, and a distill run that never runs a teacher per step."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jointdistill.data.prepared import PreparedDataset
from jointdistill.data.transforms import Draw, JointTransform
from jointdistill.distill import teacher_cache as tcache
from jointdistill.distill.connector import Connector
from jointdistill.distill.model import DistillModel
from jointdistill.models import build_student, load_model
from jointdistill.stages import distill

from .test_distill_stage import params


def _smooth_image(h, w):
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([yy / h, xx / w, torch.sin(xx / 40) * torch.cos(yy / 30)])


def _pool(x, stride=8):
    """An encoder that commutes with scaling and cropping: average pooling with the encoders' stride."""
    return F.avg_pool2d(x[None], stride, ceil_mode=True)[0]


@pytest.mark.parametrize(
    "draw",
    [
        Draw(64, 128, 1.0, 64, 128, 0, 0, False),
        Draw(64, 128, 1.0, 64, 128, 0, 0, True),
        Draw(64, 128, 1.5, 96, 192, 16, 40, False),
        Draw(64, 128, 1.25, 80, 160, 8, 24, True),
        Draw(64, 128, 0.75, 48, 96, 0, 0, True),
    ],
)
def test_warped_cached_maps_match_the_encoder_on_the_augmented_crop(draw):
    t = JointTransform(crop=(64, 128), scale=(0.75, 1.5))
    image = _smooth_image(64, 128)
    label, depth = torch.zeros(64, 128, dtype=torch.long), torch.ones(1, 64, 128)
    crop, _, _ = t.apply(draw, image, label, depth)
    expected = _pool(crop)
    warped = t.warp_features(draw, _pool(image))
    assert warped.shape == expected.shape == (3, 8, 16)
    if draw.s == 1.0:  # same grid: the cached map itself, flipped or not, exactly
        torch.testing.assert_close(warped, expected)
        return
    valid = (draw.nh - draw.top) // 8, (draw.nw - draw.left) // 8  # cells not over the zero padding
    inner = (slice(1, valid[0] - 1), slice(1, valid[1] - 1))
    if draw.flip:
        warped, expected = warped.flip(-1), expected.flip(-1)
    err = (warped[:, inner[0], inner[1]] - expected[:, inner[0], inner[1]]).abs().max()
    assert err < 0.02, err
    if draw.s < 1:  # beyond the scaled image the crop is padding: the warped map is zero there
        assert valid[1] + 1 < warped.shape[-1] and valid[0] + 1 < warped.shape[-2]
        assert warped[:, :, valid[1] + 1 :].abs().max() == 0 and warped[:, valid[0] + 1 :].abs().max() == 0


def test_draw_apply_is_the_old_single_call():
    t = JointTransform(crop=(40, 80), scale=(0.75, 1.5))
    image, label, depth = torch.rand(3, 48, 96), torch.randint(0, 5, (48, 96)), torch.rand(1, 48, 96) + 1
    a = t(image, label, depth, torch.Generator().manual_seed(3))
    d = t.draw(48, 96, torch.Generator().manual_seed(3))
    b = t.apply(d, image, label, depth)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.fixture(scope="module")
def teachers_and_key(prepared, tiny_teachers):
    models = [load_model(p / "model.pt")[0] for p in tiny_teachers]
    meta = json.loads((prepared / "meta.json").read_text())
    return models, tcache.cache_key({"seg": "a", "depth": "b"}, meta)


def test_cache_holds_the_teachers_features_and_is_reused(tmp_path, prepared, teachers_and_key):
    models, key = teachers_and_key
    folder = tmp_path / "cache"
    cache, reused = tcache.ensure(folder, models, key, prepared, torch.device("cpu"), 3)
    assert not reused and set(cache) == {"meta", "train", "val", "train_targets", "val_targets"}
    train = PreparedDataset(prepared, "train")
    assert cache["train"].shape[0] == len(train) and cache["train"].dtype == np.float16
    with torch.no_grad():
        for i in (0, len(train) - 1):
            x = train[i]["image"][None]
            ref = torch.cat([m.encode(x) for m in models], 1)[0]
            torch.testing.assert_close(torch.from_numpy(np.array(cache["train"][i])).float(), ref, rtol=2e-3, atol=2e-3)
            # the teachers' own predictions at full size: seg logits, then depth
            pred = torch.cat([models[0](x)["seg"], models[1](x)["depth"]], 1)[0]
            torch.testing.assert_close(
                torch.from_numpy(np.array(cache["train_targets"][i])).float(), pred, rtol=2e-3, atol=2e-3
            )
    assert cache["meta"]["channels"] == [m.feature_channels for m in models]

    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in models]
    try:
        _, reused = tcache.ensure(folder, models, key, prepared, torch.device("cpu"), 3)
        assert reused and not calls  # nothing ran
        other = {**key, "teachers": {"seg": "a", "depth": "c"}}  # another depth teacher: rebuilt
        _, reused = tcache.ensure(folder, models, other, prepared, torch.device("cpu"), 3)
        assert not reused
        with open(folder / "val.npy", "r+b") as f:  # a damaged file: rebuilt, not read
            f.truncate(200)
        _, reused = tcache.ensure(folder, models, other, prepared, torch.device("cpu"), 3)
        assert not reused
        assert np.load(folder / "val.npy").shape[0] == len(PreparedDataset(prepared, "val"))
    finally:
        for h in hooks:
            h.remove()


def test_cached_features_give_the_teachers_connector_outputs(teachers_and_key):
    models, _ = teachers_and_key
    torch.manual_seed(0)
    student = build_student("tiny", "light", 3)
    con = Connector([m.feature_channels for m in models], 3, 16)
    probes = torch.randn(3, 3, 48, 96)
    x = torch.randn(2, 3, 48, 96)
    with torch.no_grad():
        feats = torch.cat([m.encode(x) for m in models], 1)
        probe_feats = torch.cat([m.encode(probes) for m in models], 1)
    live = DistillModel(student, con, models, probes).train()
    cached = DistillModel(student, con, None, probes, probe_teacher_features=probe_feats).train()
    with torch.no_grad():
        a, b = live(x), cached(x, teacher_features=feats)
        torch.testing.assert_close(a["connector"]["seg"], b["connector"]["seg"])
        torch.testing.assert_close(a["connector"]["depth"], b["connector"]["depth"])
        torch.testing.assert_close(live.probe_features()[0], cached.probe_features()[0])
    assert live.teacher_images > 0 and cached.teacher_images == 0
    with pytest.raises(ValueError, match="cached teacher_features"):
        cached(x)


def test_distill_with_the_cache_never_runs_a_teacher_per_step(tmp_path, prepared, tiny_teachers):
    p = params("distill.teacher_cache=true", "distill.epochs=2")
    first = distill.run(p, prepared, tiny_teachers, tmp_path / "a", checkpoints=tmp_path / "ck")
    n_train = len(PreparedDataset(prepared, "train"))
    n_val = len(PreparedDataset(prepared, "val"))
    cache = first["teacher_cache"]
    assert cache["reused"] is False and cache["path"] == str(tmp_path / "ck" / "teacher_cache")
    # the teachers saw each train and val image once (building the cache), never per step
    assert first["teacher_forward_images"] == n_train + n_val == cache["teacher_forward_images"]
    assert first["test"]["miou"] > 0 and np.isfinite(first["test"]["abs_err"])
    assert (tmp_path / "a" / "trajectory.parquet").exists()

    second = distill.run(p, prepared, tiny_teachers, tmp_path / "b", teacher_cache=tmp_path / "ck" / "teacher_cache")
    assert second["teacher_cache"]["reused"] is True and second["teacher_forward_images"] == 0
    assert second["test"] == first["test"]  # same cache, same seed: the same student


def test_cached_predictions_are_augmented_like_the_labels(prepared):
    """The teachers' stored predictions follow the sample's augmentation as its labels and depth do: a prediction
    equal to the ground truth stays (up to the resampling of boundaries) equal to the augmented ground truth."""
    n = len(PreparedDataset(prepared, "train"))
    labels = np.load(prepared / "train" / "labels.npy")
    depth = np.load(prepared / "train" / "depth.npy")
    k = 3
    onehot = (np.arange(k)[None, :, None, None] == np.minimum(labels, k - 1)[:, None]).astype(np.float16) * 8
    targets = np.concatenate([onehot, depth[:, None].astype(np.float16)], 1)
    t = JointTransform(crop=labels.shape[1:], scale=(0.6, 1.6), hflip=True)
    ds = PreparedDataset(prepared, "train", t, seed=1, targets=targets)
    for i in range(min(n, 6)):
        item = ds[i]
        assert item["target_seg"].shape == (k, *labels.shape[1:]) and item["target_depth"].shape == item["depth"].shape
        keep = (item["label"] != 255) & (item["label"] < k - 1)
        # logits are resampled bilinearly and labels by nearest neighbour: they differ only along boundaries
        agree = (item["target_seg"].argmax(0)[keep] == item["label"][keep]).float().mean()
        assert agree > 0.95
        valid = item["depth"] > 0
        torch.testing.assert_close(item["target_depth"][valid], item["depth"][valid], rtol=1e-3, atol=1e-3)
