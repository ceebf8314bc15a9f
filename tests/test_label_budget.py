"""The label budget (``prepare.budget``): per-task shares drawn by the seed, val paid from the labels, the unlabelled
split, the loader's items for it, each teacher on its own task's frames, the teacher cache over the pool, and
distillation that learns from the teachers where a label is missing while every mode takes as many steps."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from jointdistill.config import load_params
from jointdistill.data.contract import SPLITS, UNLABELLED, verify_prepared
from jointdistill.data.prepared import Frames, PreparedDataset, TrainingSet, labelled_frames
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


BUDGET = ["prepare.budget.seg=0.3", "prepare.budget.depth=0.6"]


@pytest.fixture(scope="module")
def budget(tmp_path_factory):
    """The tiny data under a budget: depth on 60 % of the frames, seg on 30 % (nested), the rest raw."""
    out = tmp_path_factory.mktemp("budget") / "prepared"
    prepare.run(load_params(REPO / "params.yaml", [*TINY, *BUDGET]), out)
    return out


def _ids(root, split):
    m = pd.read_parquet(root / "manifest.parquet")
    return list(m[m["split"] == split].sort_values("index")["sample_id"])


def test_per_task_budgets_nest_and_val_is_paid_from_the_labels(budget, prepared):
    meta, full = verify_prepared(budget, check_digests=True), json.loads((prepared / "meta.json").read_text())
    c, lab = meta["counts"], meta["labelled"]
    assert meta["budget"] == {"seg": 0.3, "depth": 0.6}
    # val is drawn from the labelled frames alone; frames without any label are the unlabelled split
    labelled_ids = set(_ids(budget, "train")) | set(_ids(budget, "val"))
    assert all(hash_fraction(s, 0, "labelled") < 0.6 for s in labelled_ids)
    assert all(hash_fraction(s, 0, "labelled") >= 0.6 for s in _ids(budget, UNLABELLED))
    assert c["train"] + c["val"] + c[UNLABELLED] == full["counts"]["train"] + full["counts"]["val"]
    assert all(hash_fraction(s, 0, "val") < 0.15 for s in _ids(budget, "val"))
    # per task: every frame has depth (the larger share), the seg frames are those of the smaller share
    for split in ("train", "val"):
        ds = PreparedDataset(budget, split)
        has = labelled_frames(ds)
        assert has["depth"].all() and lab[split]["depth"] == c[split]
        seg_ids = {sid for sid, h in zip(_ids(budget, split), has["seg"]) if h}
        assert seg_ids == {s for s in _ids(budget, split) if hash_fraction(s, 0, "labelled") < 0.3}
        assert lab[split]["seg"] == lab[split]["all"] == len(seg_ids)
    assert 0 < lab["train"]["seg"] < c["train"]
    # the test split is the source's, fully labelled and exact, whatever the budget
    assert c["test"] == full["counts"]["test"] and lab["test"] == {
        "seg": c["test"],
        "depth": c["test"],
        "all": c["test"],
    }
    for name in ("images", "labels", "depth"):
        np.testing.assert_array_equal(
            np.load(budget / "test" / f"{name}.npy"), np.load(prepared / "test" / f"{name}.npy")
        )
    assert sorted(p.name for p in (budget / UNLABELLED).iterdir()) == ["images.npy"]  # its labels are not kept


def test_the_seed_draws_the_labelled_frames_and_never_the_test_split(budget, tmp_path):
    other = tmp_path / "seed1"
    prepare.run(load_params(REPO / "params.yaml", [*TINY, *BUDGET, "seed=1"]), other)
    seg = {}
    for root in (budget, other):
        ds = PreparedDataset(root, "train")
        seg[root] = {sid for sid, h in zip(_ids(root, "train"), labelled_frames(ds)["seg"]) if h}
    assert seg[budget] != seg[other]
    assert _ids(budget, "test") == _ids(other, "test")
    for name in ("images", "labels", "depth"):
        np.testing.assert_array_equal(np.load(budget / "test" / f"{name}.npy"), np.load(other / "test" / f"{name}.npy"))


def test_a_budget_that_leaves_a_teacher_nothing_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="no train frame has a seg label"):
        prepare.run(load_params(REPO / "params.yaml", [*TINY, "prepare.budget.seg=0.0"]), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    from jointdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="prepare.budget.seg and prepare.budget.depth"):
        load_params(REPO / "params.yaml", ["prepare.labelled_fraction=0.5"])


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
    some = Frames(train, [2, 0])
    both = TrainingSet(some, pool)
    assert len(both) == 2 + len(pool)
    assert torch.equal(both[2]["image"], pool[0]["image"])
    assert torch.equal(both[0]["label"], train[2]["label"]) and both[1]["index"] == 0
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
        ("self_train", "self_train", []),
        ("static_kd", "static_kd", ["distill.teacher_cache=true"]),
        ("static_kd-no-pool", "static_kd", ["distill.unlabelled_batch=0"]),
    ):
        teachers = tiny_teachers if name.startswith("static_kd") else None
        out[name] = distill.run(
            load_params(REPO / "params.yaml", [*FAST, f"distill.mode={mode}", "distill.unlabelled_batch=2", *extra]),
            budget,
            teachers,
            root / name,
            teacher_cache=root / "cache",
        )
    return root, out


def test_every_mode_reads_the_pool_and_takes_the_same_steps(budget, budget_runs):
    root, runs = budget_runs
    meta = json.loads((budget / "meta.json").read_text())
    c, lab = meta["counts"], meta["labelled"]["train"]
    kd, mtl, off = runs["static_kd"], runs["mtl"], runs["static_kd-no-pool"]
    pool = c["train"] - lab["all"] + c[UNLABELLED]  # depth-only train frames and raw frames
    n = c["train"] + c[UNLABELLED]  # frames an epoch draws in every mode
    want = {"train": c["train"], "fully_labelled": lab["all"], "pool": pool, "pool_batch": 2, "epoch_samples": n}
    probes = {"split": UNLABELLED, "images": 4}  # raw frames: there the teachers are the only supervision
    assert kd["data"] == want | {"probes": probes}
    # mtl reads the pool too: its depth-only frames carry depth labels (raw frames just add nothing to its loss)
    assert mtl["data"] == want | {"probes": probes}
    assert off["data"] == want | {"pool": 0, "pool_batch": 0, "probes": probes}
    steps = 2 * (n // 4)
    for r in runs.values():
        assert r["history"][-1]["step"] == steps
        assert all(np.isfinite(e["train/loss"]) for e in r["history"])
    # the cache holds the teachers' predictions for the pool, one per image
    cached = np.load(root / "cache" / f"{UNLABELLED}_targets.npy", mmap_mode="r")
    assert cached.shape[0] == c[UNLABELLED] and kd["teacher_cache"]["teacher_forward_images"] == sum(
        c[s] for s in ("train", "val", UNLABELLED)
    )
    # forgetting is measured on the probes against each teacher, every timeframe, in the KD modes
    assert len(kd["probe_kd"]) == kd["timeframes"] and all(r["seg"] >= 0 and r["depth"] >= 0 for r in kd["probe_kd"])
    assert mtl["probe_kd"] == []


def test_probes_come_from_frames_without_a_label(budget, budget_runs):
    import pyarrow.parquet as pq

    from jointdistill.distill.builder import probe_candidates

    root, _ = budget_runs
    n_raw = json.loads((budget / "meta.json").read_text())["counts"][UNLABELLED]
    images = set(pq.read_table(root / "static_kd" / "trajectory.parquet").column("image").to_pylist())
    assert len(images) == 4 and all(0 <= i < n_raw for i in images)  # indices into the unlabelled split
    # without enough raw frames: the train frames that miss a task's label
    train = PreparedDataset(budget, "train")
    has = labelled_frames(train)
    missing = probe_candidates(train, 2)
    assert len(missing) and not any(has["seg"][i] and has["depth"][i] for i in missing)
    assert len(probe_candidates(train, len(train))) == len(train)  # too few: any train frame (warned)


def test_self_train_is_a_kd_mode_without_teachers(budget_runs):
    root, runs = budget_runs
    r = runs["self_train"]
    assert r["mode"] == "self_train" and r["teachers"] is None and r["teacher_forward_images"] == 0
    assert r["weights"]["history"] == [] and r["weights"]["final"] == {"seg": 1.0, "depth": 1.0}
    # its KD term exists once the first timeframe has given it a frozen copy of the student
    kd = [e.get("train/kd_seg") for e in r["history"]]
    assert kd[0] is None or kd[0] == 0 or np.isfinite(kd[0])
    assert any(v is not None and v > 0 for v in kd[1:]), kd


def test_a_teacher_trains_on_its_own_tasks_frames_for_as_many_steps_as_the_data_has(budget, tmp_path):
    from jointdistill.stages import teacher

    from .conftest import TEACHERS

    meta = json.loads((budget / "meta.json").read_text())
    c, lab = meta["counts"], meta["labelled"]["train"]
    p = load_params(REPO / "params.yaml", [*TINY, *TEACHERS, "teacher.epochs=1"])
    r = teacher.run(p, "seg", budget, tmp_path / "seg", checkpoints=tmp_path / "ck")
    assert r["data"] == {"train": lab["seg"], "epoch_samples": c["train"] + c[UNLABELLED]}
    last = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert last["run"]["global_step"] == (c["train"] + c[UNLABELLED]) // 4 > lab["seg"] // 4


def test_kd_on_a_frame_without_depth_stays_in_the_teachers_valid_range():
    from jointdistill.distill.objective import kd_pixels

    label = torch.full((2, 2, 3), 255)
    label[0, 0, 0] = 1  # frame 0 has a seg label on one pixel; frame 1 none
    depth = torch.zeros(2, 1, 2, 3)
    depth[0, 0, 1, 1] = 5.0  # frame 0 has depth on one pixel; frame 1 none
    soft = torch.tensor([[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]], [[[0.5, 150.0, 99.0], [0.0, 20.0, 100.0]]]])
    kd_label, kd_depth = kd_pixels(label, depth, 255, soft, 100.0)
    assert (kd_label[0] == label[0]).all() and (kd_label[1] != 255).all()  # raw frame: seg KD everywhere
    assert torch.equal(kd_depth[0], depth[0])  # labelled frame: where its depth is valid
    assert kd_depth[1].flatten().tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]  # raw frame: teacher in (0, 100)


def test_older_prepared_folders_without_the_split_still_load(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    meta["counts"].pop(UNLABELLED)
    meta.pop("labelled", None)
    from jointdistill.data.contract import split_count
    from jointdistill.distill.plan import DistillPlan

    assert split_count(meta, UNLABELLED) == 0 and all(split_count(meta, s) == meta["counts"][s] for s in SPLITS)
    assert (
        DistillPlan.from_params(load_params(REPO / "params.yaml", ["distill.mode=full"]).distill, meta).pool_batch == 0
    )
