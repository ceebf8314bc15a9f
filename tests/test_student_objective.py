"""The student's objective and the model it trains: the balanced depth loss, per-term gradient norms on the
encoder, the calibrated trajectory share, the connector's own unweighted loss and its warm-up, timeframes every N
steps, the soft targets of each kd_target (live, cached, zoomed), and the plan's connector decision."""

import csv
import json
import math

import pytest
import torch

from jointdistill.config import load_params
from jointdistill.distill.connector import Connector
from jointdistill.distill.losses import kd_depth, kd_seg
from jointdistill.distill.model import DistillModel
from jointdistill.distill.objective import StudentObjective
from jointdistill.distill.plan import DistillPlan
from jointdistill.distill.trajectory import top_k_points
from jointdistill.evaluation.metrics import depth_loss, seg_loss
from jointdistill.models import build_student, build_teacher, model_flops
from jointdistill.stages import distill

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


def params(*extra):
    return load_params(REPO / "params.yaml", [*FAST, *extra])


# ----------------------------------------------------------------------------- losses
def test_log_l1_depth_loss_by_hand():
    pred = torch.tensor([[[[2.0, 10.0], [5.0, 1.0]]]])
    gt = torch.tensor([[[[1.0, 20.0], [0.0, 1.0]]]])  # one invalid pixel (0)
    by_hand = (abs(math.log(2.0)) + abs(math.log(0.5)) + 0.0) / 3
    assert depth_loss(pred, gt, "log_l1").item() == pytest.approx(by_hand, rel=1e-6)
    # Scale-aware: the same relative error costs the same near and far (L1 in metres grows with distance).
    assert depth_loss(pred * 10, gt * 10, "log_l1").item() == pytest.approx(by_hand, rel=1e-6)
    assert depth_loss(pred * 10, gt * 10, "l1").item() == pytest.approx(10 * depth_loss(pred, gt, "l1").item())
    # The depth KD term uses the same scale as the task's loss.
    target = torch.tensor([[[[1.0, 20.0], [9.0, 1.0]]]])
    assert kd_depth(pred, target, gt, "log_l1").item() == pytest.approx(by_hand, rel=1e-6)
    assert kd_depth(pred, target, gt, "l1").item() == pytest.approx((1 + 10 + 0) / 3)


# ----------------------------------------------------------------------------- the student's task
def _task(mode="full", **over):
    cfg = params(f"distill.mode={mode}", *(f"distill.{k}={v}" for k, v in over.items())).distill
    torch.manual_seed(0)
    student = build_student("tiny", "light", 3, tiny_widths=(8, 8, 16, 16), head_channels=8)
    teachers = [build_teacher(t, "tiny", "light", 3, tiny_widths=(8, 8, 16, 16)) for t in ("seg", "depth")]
    con = Connector([16, 16], 3, hidden=8)
    probes = torch.randn(4, 3, 32, 48)
    model = DistillModel(student, con, teachers, probes, traj_every=1, traj_batch=2).train()
    job = StudentObjective(model, cfg, 3, 255, {"seg": 0.5, "depth": 0.2}, [0, 1, 2, 3])
    g = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.randn(2, 3, 32, 48, generator=g),
        "label": torch.randint(0, 3, (2, 32, 48), generator=g),
        "depth": torch.rand(2, 1, 32, 48, generator=g) * 20 + 1,
    }
    return model, job, batch


def _encoder_grad_norm(term, model):
    params = list(model.student.backbone.parameters())
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)]).norm()


def test_gradient_norms_on_the_encoder_match_autograd():
    model, job, batch = _task("static_kd", grad_log_every=1)
    out = model(batch["image"])
    job.loss(out, batch)
    (row,) = job.grad_norms
    cfg, s, c = job.cfg, out["student"], out["connector"]
    seg = cfg.lambda_seg * seg_loss(s["seg"], batch["label"])
    dep = cfg.lambda_depth * depth_loss(s["depth"], batch["depth"], cfg.depth_loss)
    kds = cfg.lambda_kd * kd_seg(s["seg"], c["seg"], batch["label"])
    assert row["step"] == 0
    assert row["norm/seg"] == pytest.approx(_encoder_grad_norm(seg, model).item(), rel=1e-4)
    assert row["norm/depth"] == pytest.approx(_encoder_grad_norm(dep, model).item(), rel=1e-4)
    assert row["norm/kd_seg"] == pytest.approx(_encoder_grad_norm(kds, model).item(), rel=1e-4)
    assert row["ratio/depth_seg"] == pytest.approx(row["norm/depth"] / row["norm/seg"], rel=1e-6)
    summary = job.gradient_summary()
    assert summary["measurements"] == 1 and sum(summary["share"].values()) == pytest.approx(1.0)
    # Not measured between intervals.
    job.cfg = job.cfg.model_copy(update={"grad_log_every": 5})
    job.loss(model(batch["image"]), batch)  # step 1
    assert len(job.grad_norms) == 1


def test_trajectory_share_is_calibrated_and_omega_leaves_the_connector_loss_alone():
    model, job, batch = _task("full", grad_log_every=0, traj_share=0.2)
    # A recorded timeframe turns the trajectory loss on (buffer of the connector's points).
    fused, _ = model.probe_features()
    from jointdistill.distill.trajectory import attention_map

    job.grid = tuple(fused.shape[-2:])
    job.buffer.append(top_k_points(attention_map(fused), 5))
    model.trajectory_on = True
    out = model(batch["image"])
    total, parts = job.loss(out, batch)
    # The first trajectory step calibrates its scale: its encoder gradient is 20 % of the other terms'.
    (row,) = job.grad_norms
    assert row["norm/traj"] == pytest.approx(0.2 * row["norm/total"], rel=1e-4)
    assert job.traj_scale == pytest.approx(row["traj_scale"]) and job.traj_scale > 0
    # ω weights what the student takes from each teacher, not the connector's own label loss.
    grads = {}
    for w in ({"seg": 1.0, "depth": 1.0}, {"seg": 0.1, "depth": 1.9}):
        job.weights.weights = dict(w)
        t, _ = job.loss(out, batch)
        g = torch.autograd.grad(t, list(model.connector.parameters()), retain_graph=True)
        grads[w["seg"]] = torch.cat([x.flatten() for x in g])
    torch.testing.assert_close(grads[1.0], grads[0.1])
    assert parts["traj"] > 0 and torch.isfinite(total)


# ----------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def stepped(prepared, tiny_teachers, tmp_path_factory):
    """A full run with timeframes every 3 steps and a 20-step connector warm-up, from the teachers' cache."""
    root = tmp_path_factory.mktemp("stepped")
    p = params(
        "distill.timeframe_steps=3",
        "distill.connector_warmup=20",
        "distill.teacher_cache=true",
        "distill.grad_log_every=2",
    )
    report = distill.run(p, prepared, tiny_teachers, root / "out", root / "ck")
    return root, p, report


def test_timeframes_every_n_steps(stepped, prepared):
    root, p, report = stepped
    n_train = json.loads((prepared / "meta.json").read_text())["counts"]["train"]
    total = p.distill.epochs * (n_train // p.distill.batch_size)
    expected = [s for s in range(1, total + 1) if s % 3 == 0 or s == total]
    assert [h["step"] for h in report["history"]] == expected and report["timeframes"] == len(expected)
    with open(root / "out" / "weights.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["timeframe"] != "0"][::2] == expected
    assert [f["step"] for f in report["trajectory"]["per_timeframe"]] == expected
    # One dvclive step per timeframe.
    with open(root / "out" / "dvclive" / "plots" / "metrics" / "val" / "miou.tsv") as f:
        steps = [int(line.split("\t")[0]) for line in list(f)[1:]]
    assert steps == list(range(len(expected)))
    assert 0 < report["validation_share"] < 1 and report["validation_seconds"] > 0
    # The connector is scored on val every timeframe, and logged.
    assert [h["timeframe"] for h in report["connector"]["history"]] == list(range(1, len(expected) + 1))
    assert all(0 <= h["miou"] <= 1 and h["abs_err"] > 0 for h in report["connector"]["history"])
    assert (root / "out" / "dvclive" / "plots" / "metrics" / "connector" / "miou.tsv").exists()
    # Gradient norms measured every 2 steps, summarised, and logged per timeframe.
    g = report["gradients"]
    assert g["measurements"] >= total // 2 and {"seg", "depth", "kd_seg", "kd_depth", "traj"} <= set(g["mean_norm"])
    assert g["depth_seg_ratio"] > 0 and g["traj_scale"] > 0
    assert (root / "out" / "dvclive" / "plots" / "metrics" / "grad" / "ratio" / "depth_seg.tsv").exists()
    # FLOPs of the student and its teachers at the training size.
    assert report["flops"]["student"] > 0 and report["teachers"]["seg"]["flops"] > 0


def test_connector_warmup_gives_better_targets_and_is_kept_for_a_resume(stepped, prepared, tiny_teachers):
    root, p, report = stepped
    warm = report["connector"]["warmup"]
    assert warm["steps"] == 20 and warm["reused"] is False and warm["last_loss"] < warm["first_loss"]
    assert (root / "ck" / "connector-warmup.pt").exists()
    # Better targets than the untrained connector it started from, on val.
    assert warm["val"]["miou"] > warm["val_before"]["miou"] and warm["val"]["abs_err"] < warm["val_before"]["abs_err"]
    # Resumed with the same digest: the warm-up is loaded, not repeated, and the result is the same.
    again = distill.run(p, prepared, tiny_teachers, root / "again", root / "ck", resume=True)
    assert again["connector"]["warmup"]["reused"] is True
    assert again["connector"]["warmup"]["val"] == warm["val"]
    assert again["test"]["miou"] == pytest.approx(report["test"]["miou"])


def test_flops_count_multiply_adds_twice():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1, bias=False))
    assert model_flops(conv, 5, 7) == 2 * 3 * 4 * 5 * 7


# ----------------------------------------------------------------------------- ablation statistics


def test_kd_target_teachers_are_the_teachers_own_predictions():
    torch.manual_seed(0)
    student = build_student("tiny", "light", 3, tiny_widths=(8, 8, 16, 16), head_channels=8)
    teachers = [build_teacher(t, "tiny", "light", 3, tiny_widths=(8, 8, 16, 16)) for t in ("seg", "depth")]
    for t in teachers:
        t.eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        expected = {"seg": teachers[0](x)["seg"], "depth": teachers[1](x)["depth"]}
        cached = torch.cat([t.encode(x) for t in teachers], 1)
    con = Connector([16, 16], 3, hidden=8)
    live = DistillModel(student, con, teachers, target_teachers=teachers).train()
    from_cache = DistillModel(student, con, None, probe_teacher_features=cached[:1], target_teachers=teachers).train()
    for out in (live(x), from_cache(x, teacher_features=cached)):
        for task in ("seg", "depth"):
            torch.testing.assert_close(out["targets"][task], expected[task])
    # The KD term then measures the student against the teachers, not the connector.
    cfg = params("distill.mode=static_kd", "distill.kd_target=teachers").distill
    job = StudentObjective(live, cfg, 3, 255, {"seg": 0.5, "depth": 0.2}, [])
    batch = {"image": x, "label": torch.randint(0, 3, (2, 32, 48)), "depth": torch.rand(2, 1, 32, 48) + 1}
    out = live(x)
    _, parts = job.loss(out, batch)
    assert parts["kd_seg"] == pytest.approx(kd_seg(out["student"]["seg"], expected["seg"], batch["label"]).item())
    assert "targets" not in DistillModel(student, con, teachers).train()(x)  # kd_target: connector


def test_static_kd_and_adaptive_from_the_teachers_train_no_connector():
    """With kd_target=teachers the connector only serves the trajectory (full): static_kd and adaptive leave it out,
    and their KD term still reads the teachers' predictions, live or from the cache."""
    assert [
        DistillPlan.from_params(params(f"distill.mode={m}", "distill.kd_target=teachers").distill).connector
        for m in ("mtl", "static_kd", "adaptive", "full")
    ] == [False, False, False, True]
    assert DistillPlan.from_params(params("distill.mode=static_kd", "distill.kd_target=connector").distill).connector
    torch.manual_seed(0)
    student = build_student("tiny", "light", 3, tiny_widths=(8, 8, 16, 16), head_channels=8)
    teachers = [build_teacher(t, "tiny", "light", 3, tiny_widths=(8, 8, 16, 16)).eval() for t in ("seg", "depth")]
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        expected = {"seg": teachers[0](x)["seg"], "depth": teachers[1](x)["depth"]}
    batch = {"image": x, "label": torch.randint(0, 3, (2, 32, 48)), "depth": torch.rand(2, 1, 32, 48) + 1}
    live = DistillModel(student, None, teachers, target_teachers=teachers).train()
    cached = DistillModel(student, None, None, target_teachers=teachers).train()
    for mode in ("static_kd", "adaptive"):
        for model, kwargs in ((live, {}), (cached, {"target_seg": expected["seg"], "target_depth": expected["depth"]})):
            cache = "false" if model is live else "true"
            cfg = params(f"distill.mode={mode}", "distill.kd_target=teachers", f"distill.teacher_cache={cache}").distill
            job = StudentObjective(model, cfg, 3, 255, {"seg": 0.5, "depth": 0.2}, [])
            assert job.model_inputs == (() if model is live else ("target_seg", "target_depth"))
            out = model(x, **kwargs)
            assert "connector" not in out and model.clip_groups() == [list(student.parameters())]
            for task in ("seg", "depth"):
                torch.testing.assert_close(out["targets"][task], expected[task])
            total, parts = job.loss(out, batch)
            assert parts["kd_seg"] == pytest.approx(
                kd_seg(out["student"]["seg"], expected["seg"], batch["label"]).item()
            )
            assert parts["kd_depth"] == pytest.approx(
                kd_depth(out["student"]["depth"], expected["depth"], batch["depth"], "log_l1").item()
            )
            assert "connector_seg_ce" not in parts and torch.isfinite(total)
    # mtl: no targets, no KD term.
    mtl = StudentObjective(DistillModel(student), params("distill.mode=mtl").distill, 3, 255, None, [])
    _, parts = mtl.loss(DistillModel(student).train()(x), batch)
    assert "kd_seg" not in parts


def test_kd_depth_pixels_all_fills_the_ground_truths_holes():
    torch.manual_seed(0)
    student = build_student("tiny", "light", 3, tiny_widths=(8, 8, 16, 16), head_channels=8)
    teachers = [build_teacher(t, "tiny", "light", 3, tiny_widths=(8, 8, 16, 16)) for t in ("seg", "depth")]
    con = Connector([16, 16], 3, hidden=8)
    model = DistillModel(student, con, teachers, target_teachers=teachers).train()
    x = torch.randn(2, 3, 32, 48)
    depth = torch.rand(2, 1, 32, 48) + 1
    depth[:, :, :10] = 0  # a hole: no ground truth there
    batch = {"image": x, "label": torch.randint(0, 3, (2, 32, 48)), "depth": depth}
    out = model(x)
    out["targets"]["depth"] = torch.rand(2, 1, 32, 48) * 20 + 1  # untrained heads all say 10 m
    s, t = out["student"]["depth"], out["targets"]["depth"]
    for pixels, gt in (("valid", depth), ("all", None)):
        cfg = params(
            "distill.mode=static_kd", "distill.kd_target=teachers", f"distill.kd_depth_pixels={pixels}"
        ).distill
        _, parts = StudentObjective(model, cfg, 3, 255, {"seg": 0.5, "depth": 0.2}, []).loss(out, batch)
        assert parts["kd_depth"] == pytest.approx(kd_depth(s, t, gt, "log_l1").item(), rel=1e-6)
    assert kd_depth(s, t, depth, "log_l1").item() != pytest.approx(kd_depth(s, t, None, "log_l1").item())


def test_depth_read_from_cached_maps_follows_the_zoom_of_the_augmentation():
    """A cached map is only resampled by the sample's zoom s, so the heads reading it predict the un-zoomed depth;
    the augmented labels hold depth / s, and so must the connector's and the teachers' depth."""
    torch.manual_seed(0)
    student = build_student("tiny", "light", 3, tiny_widths=(8, 8, 16, 16), head_channels=8)
    teachers = [build_teacher(t, "tiny", "light", 3, tiny_widths=(8, 8, 16, 16)) for t in ("seg", "depth")]
    con = Connector([16, 16], 3, hidden=8)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        cached = torch.cat([t.encode(x) for t in teachers], 1)
    model = DistillModel(student, con, None, probe_teacher_features=cached[:1], target_teachers=teachers).train()
    plain = model(x, teacher_features=cached)
    zoomed = model(x, teacher_features=cached, feature_scale=torch.tensor([2.0, 0.8]))
    for key in ("connector", "targets"):
        expected = plain[key]["depth"] / torch.tensor([2.0, 0.8]).view(-1, 1, 1, 1)
        torch.testing.assert_close(zoomed[key]["depth"], expected)
        torch.testing.assert_close(zoomed[key]["seg"], plain[key]["seg"])


def test_prepared_items_carry_the_zoom_their_cached_maps_were_warped_by(prepared, tiny_params):
    import numpy as np

    from jointdistill.data.prepared import PreparedDataset
    from jointdistill.data.transforms import JointTransform

    n = len(PreparedDataset(prepared, "train"))
    feats = np.zeros((n, 4, 6, 12), np.float16)
    h, w = tiny_params.prepare.height, tiny_params.prepare.width
    aug = PreparedDataset(prepared, "train", JointTransform((h, w), (0.5, 2.0), True), seed=0, features=feats)
    scales = [float(aug[i]["feature_scale"]) for i in range(min(n, 8))]
    assert all(0.5 <= s <= 2.0 for s in scales) and len(set(scales)) > 1
    plain = PreparedDataset(
        prepared, "val", features=np.zeros((len(PreparedDataset(prepared, "val")), 4, 6, 12), np.float16)
    )
    assert float(plain[0]["feature_scale"]) == 1.0
    assert "feature_scale" not in PreparedDataset(prepared, "val")[0]


def test_connector_runs_on_the_labelled_rows_alone_where_its_outputs_are_not_soft_targets():
    """kd_target=teachers: the connector's only loss is on labels, so the rows of the unlabelled split are left
    out of its forward; every row is still distilled from the teachers. With kd_target=connector it sees them all."""
    torch.manual_seed(0)
    student = build_student("tiny", "light", 3, tiny_widths=(8, 8, 16, 16), head_channels=8)
    teachers = [build_teacher(t, "tiny", "light", 3, tiny_widths=(8, 8, 16, 16)).eval() for t in ("seg", "depth")]
    con = Connector([16, 16], 3, hidden=8)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 32, 48, generator=g)
    label = torch.randint(0, 3, (4, 32, 48), generator=g)
    depth = torch.rand(4, 1, 32, 48, generator=g) * 20 + 1
    label[[1, 3]], depth[[1, 3]] = 255, 0.0  # rows 1 and 3: the unlabelled split
    batch = {"image": x, "label": label, "depth": depth}
    model = DistillModel(student, con, teachers, target_teachers=teachers, connector_on_labelled=True).train()
    cfg = params(
        "distill.mode=full", "distill.kd_target=teachers", "distill.grad_log_every=0", "distill.teacher_cache=false"
    ).distill
    job = StudentObjective(model, cfg, 3, 255, {"seg": 0.5, "depth": 0.2}, [])
    assert job.model_inputs == ("label",)
    out = model(x, label=label)
    c = out["connector"]
    assert c["rows"].tolist() == [0, 2] and c["seg"].shape[0] == 2 and c["depth"].shape[0] == 2
    assert out["student"]["seg"].shape[0] == 4 and out["targets"]["seg"].shape[0] == 4  # KD still on every row
    with torch.no_grad():
        feats = [t.encode(x[[0, 2]]) for t in teachers]
    by_hand = Connector([16, 16], 3, hidden=8)
    by_hand.load_state_dict(con.state_dict())
    expected = by_hand.train()(feats, (32, 48))
    torch.testing.assert_close(c["seg"], expected["seg"])
    _, parts = job.loss(out, batch)
    assert parts["connector_seg_ce"] == pytest.approx(seg_loss(expected["seg"], label[[0, 2]]).item(), rel=1e-5)
    assert parts["connector_depth"] == pytest.approx(
        depth_loss(expected["depth"], depth[[0, 2]], cfg.depth_loss).item(), rel=1e-5
    )
    # Every row labelled (no budget): nothing to leave out, the connector sees the whole batch.
    assert "rows" not in model(x[[0, 2]], label=label[[0, 2]])["connector"]
    # kd_target=connector: its outputs are the soft targets of every row.
    full_rows = DistillModel(student, con, teachers).train()
    job = StudentObjective(
        full_rows,
        params("distill.mode=full", "distill.kd_target=connector").distill,
        3,
        255,
        {"seg": 0.5, "depth": 0.2},
        [],
    )
    assert "label" not in job.model_inputs
    assert full_rows(x)["connector"]["seg"].shape[0] == 4
