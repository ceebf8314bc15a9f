"""A label budget (``prepare.labelled_fraction``): the unlabelled split prepare writes, the loader's items for it,
the teacher cache over it, and distillation that learns from the teachers on it while mtl takes as many steps."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from jointdistill.config import load_params
from jointdistill.data.contract import SPLITS, UNLABELLED, verify_prepared
from jointdistill.data.prepared import PreparedDataset, TrainingSet
from jointdistill.data.split import hash_fraction
from jointdistill.data.transforms import JointTransform
from jointdistill.errors import DataError
from jointdistill.stages import distill, prepare
from jointdistill.training.sampling import EpochSampler

from .conftest import REPO, TINY

FAST = [
    *TINY,
    "distill.batch_size=4",
    "distill.epochs=2",
    "distill.probe_images=4",
    "distill.top_k=5",
    "distill.traj_batch=2",
    "distill.trajectory_length=2",
]


@pytest.fixture(scope="module")
def budget(tmp_path_factory):
    """The tiny data with half of train's labels kept."""
    out = tmp_path_factory.mktemp("budget") / "prepared"
    prepare.run(load_params(REPO / "params.yaml", [*TINY, "prepare.labelled_fraction=0.5"]), out)
    return out


def test_the_unlabelled_split_is_the_rest_of_train_and_leaves_val_and_test_alone(budget, prepared):
    meta, full = verify_prepared(budget, check_digests=True), json.loads((prepared / "meta.json").read_text())
    c = meta["counts"]
    assert c[UNLABELLED] > 0 and c["train"] > 0 and meta["labelled_fraction"] == 0.5
    assert c["train"] + c[UNLABELLED] == full["counts"]["train"] and full["counts"][UNLABELLED] == 0
    for split in ("val", "test"):
        assert c[split] == full["counts"][split]
        for name in ("images", "labels", "depth"):
            np.testing.assert_array_equal(
                np.load(budget / split / f"{name}.npy"), np.load(prepared / split / f"{name}.npy")
            )
    assert sorted(p.name for p in (budget / UNLABELLED).iterdir()) == ["images.npy"]  # its labels are not kept
    manifest = pd.read_parquet(budget / "manifest.parquet")
    pool = manifest[manifest["split"] == UNLABELLED]
    assert len(pool) == c[UNLABELLED] and (pool["source_split"] == "train").all()
    assert all(hash_fraction(s, 0, "labelled") >= 0.5 for s in pool["sample_id"])
    kept = manifest[manifest["split"] == "train"]["sample_id"]
    assert all(hash_fraction(s, 0, "labelled") < 0.5 for s in kept)
    # the pool's images are train's images of the full preparation, in the same order
    full_manifest = pd.read_parquet(prepared / "manifest.parquet")
    full_train = full_manifest[full_manifest["split"] == "train"].set_index("sample_id")["index"]
    images = np.load(prepared / "train" / "images.npy")
    np.testing.assert_array_equal(
        np.load(budget / UNLABELLED / "images.npy"),
        images[full_train[pool.sort_values("index")["sample_id"]].to_numpy()],
    )


def test_a_damaged_unlabelled_split_is_one_clear_error(budget, tmp_path):
    import shutil

    copy = tmp_path / "prepared"
    shutil.copytree(budget, copy)
    (copy / UNLABELLED / "images.npy").write_bytes(b"not an array")
    with pytest.raises(DataError, match="unlabelled/images.npy"):
        verify_prepared(copy)


def test_unlabelled_items_carry_no_label_and_draw_their_own_augmentation(budget):
    meta = json.loads((budget / "meta.json").read_text())
    h, w = meta["resolution"]
    params = load_params(REPO / "params.yaml", TINY)
    t = JointTransform.from_params(params.augment, h, w)
    pool = PreparedDataset(budget, UNLABELLED, t, seed=0)
    train = PreparedDataset(budget, "train", t, seed=0)
    item = pool[0]
    assert item["image"].shape == (3, h, w)
    assert (item["label"] == 255).all() and (item["depth"] == 0).all()
    both = TrainingSet(train, pool)
    assert len(both) == len(train) + len(pool)
    assert torch.equal(both[len(train)]["image"], pool[0]["image"])
    assert torch.equal(both[len(train) - 1]["label"], train[len(train) - 1]["label"])
    with pytest.raises(IndexError):
        both[len(both)]
    both.set_epoch(3)
    assert train.epoch == 3 and pool.epoch == 3
    plain = PreparedDataset(budget, UNLABELLED)
    augmented = []
    for epoch in range(4):  # fixed by (seed, epoch, item), and not the identity in every epoch
        pool.set_epoch(epoch)
        assert torch.equal(pool[0]["image"], pool[0]["image"])
        augmented.append(not torch.equal(pool[0]["image"], plain[0]["image"]))
    assert any(augmented)


def test_a_longer_epoch_chains_permutations():
    s = EpochSampler(10, 2, seed=1, shuffle=True)
    longer = EpochSampler(10, 2, seed=1, shuffle=True, length=25)
    order = list(longer)
    assert len(order) == 24 and longer.batches_per_epoch() == 12  # 25 rounded down to whole batches
    assert order[:10] == list(s)  # its first pass is the plain epoch
    assert sorted(order[:20]) == sorted(list(range(10)) * 2)
    assert order[10:20] != order[:10]
    longer.set_epoch(1)
    assert list(longer) != order


def test_a_pool_adds_its_own_items_to_every_step_and_keeps_the_labelled_part():
    plain = EpochSampler(10, 2, seed=1, shuffle=True, length=25)
    mixed = EpochSampler(10, 2, seed=1, shuffle=True, length=25, pool=7, pool_batch=3)
    assert mixed.step_size == 5 and mixed.batches_per_epoch() == plain.batches_per_epoch() == 12
    order, labelled = list(mixed), list(plain)
    steps = [order[i : i + 5] for i in range(0, len(order), 5)]
    assert [i for s in steps for i in s[:2]] == labelled  # the labelled part is exactly the plain sampler's
    pool = [i for s in steps for i in s[2:]]
    assert all(10 <= i < 17 for i in pool) and sorted(pool[:7]) == list(range(10, 17))  # permutations of the pool
    mixed.set_epoch(0, skip_batches=4)  # resuming mid-epoch skips whole steps
    assert list(mixed) == order[4 * 5 :]
    # two processes: each takes its share of a step's labelled and pool items, together the single-process step
    ranks = [
        EpochSampler(10, 2, seed=1, shuffle=True, rank=r, world=2, length=25, pool=7, pool_batch=3) for r in (0, 1)
    ]
    a, b = (list(r) for r in ranks)
    assert ranks[0].step_size == 5 and len(a) == len(b) == 6 * 5
    both = EpochSampler(10, 4, seed=1, shuffle=True, length=25, pool=7, pool_batch=6)
    for k, step in enumerate(both._indices()[i : i + 10] for i in range(0, 60, 10)):
        ra, rb = a[k * 5 : k * 5 + 5], b[k * 5 : k * 5 + 5]
        assert sorted(ra[:2] + rb[:2]) == sorted(step[:4]) and sorted(ra[2:] + rb[2:]) == sorted(step[4:])


@pytest.fixture(scope="module")
def budget_runs(budget, tiny_teachers, tmp_path_factory):
    root = tmp_path_factory.mktemp("budget-runs")
    out = {}
    for name, mode, extra in (
        ("mtl", "mtl", []),
        ("static_kd", "static_kd", ["distill.teacher_cache=true"]),
        ("static_kd-no-pool", "static_kd", ["distill.unlabelled_batch=0"]),
    ):
        teachers = None if mode == "mtl" else tiny_teachers
        out[name] = distill.run(
            load_params(REPO / "params.yaml", [*FAST, f"distill.mode={mode}", "distill.unlabelled_batch=2", *extra]),
            budget,
            teachers,
            root / name,
            teacher_cache=root / "cache",
        )
    return root, out


def test_kd_learns_from_the_pool_and_every_mode_takes_the_same_steps(budget, budget_runs):
    root, runs = budget_runs
    c = json.loads((budget / "meta.json").read_text())["counts"]
    kd, mtl, off = runs["static_kd"], runs["mtl"], runs["static_kd-no-pool"]
    n = c["train"] + c[UNLABELLED]  # labelled samples an epoch draws in every mode
    assert kd["data"] == {"train": c["train"], "unlabelled": c[UNLABELLED], "unlabelled_batch": 2, "epoch_samples": n}
    assert mtl["data"] == {"train": c["train"], "unlabelled": 0, "unlabelled_batch": 0, "epoch_samples": n}
    assert off["data"] == {"train": c["train"], "unlabelled": 0, "unlabelled_batch": 0, "epoch_samples": n}
    steps = 2 * (n // 4)
    assert kd["history"][-1]["step"] == mtl["history"][-1]["step"] == off["history"][-1]["step"] == steps
    # the cache holds the teachers' predictions for the pool, one per image
    cached = np.load(root / "cache" / f"{UNLABELLED}_targets.npy", mmap_mode="r")
    assert cached.shape[0] == c[UNLABELLED] and kd["teacher_cache"]["teacher_forward_images"] == sum(
        c[s] for s in ("train", "val", UNLABELLED)
    )
    for r in runs.values():
        assert all(np.isfinite(e["train/loss"]) for e in r["history"])


def test_a_teacher_under_a_label_budget_takes_as_many_steps_as_on_all_labels(budget, tmp_path):
    from jointdistill.stages import teacher

    from .conftest import TEACHERS

    c = json.loads((budget / "meta.json").read_text())["counts"]
    p = load_params(REPO / "params.yaml", [*TINY, *TEACHERS, "teacher.epochs=1"])
    r = teacher.run(p, "depth", budget, tmp_path / "depth", checkpoints=tmp_path / "ck")
    assert r["data"] == {"train": c["train"], "epoch_samples": c["train"] + c[UNLABELLED]}
    last = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert last["run"]["global_step"] == (c["train"] + c[UNLABELLED]) // 4 > c["train"] // 4


def test_older_prepared_folders_without_the_split_still_load(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    meta["counts"].pop(UNLABELLED)
    from jointdistill.data.contract import split_count

    assert split_count(meta, UNLABELLED) == 0 and all(split_count(meta, s) == meta["counts"][s] for s in SPLITS)
