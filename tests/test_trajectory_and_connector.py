"""The knowledge trajectory (attention maps, top-k points, buffer, loss), the connector, the KD losses and the
distill model's probe pass and gradient groups."""

import pytest
import torch

from jointdistill.distill.connector import Connector
from jointdistill.distill.trajectory import (
    TrajectoryBuffer,
    attention_map,
    resize_attention,
    rows,
    top_k_points,
    trajectory_loss,
)
from jointdistill.models import build_teacher

# ----------------------------------------------------------------------------- weights


# ----------------------------------------------------------------------------- trajectory


def test_attention_map_by_hand():
    f = torch.zeros(1, 2, 1, 2)
    f[0, :, 0, 0] = torch.tensor([1.0, 3.0])  # mean of squares 5
    f[0, :, 0, 1] = torch.tensor([0.0, 0.0])
    a = attention_map(f)
    assert a.shape == (1, 1, 2)
    assert a[0, 0].tolist() == pytest.approx([1.0, 0.0])
    b = attention_map(torch.ones(2, 3, 2, 2))
    assert b[0].flatten().tolist() == pytest.approx([0.5] * 4)  # L2-normalised over space


def test_top_k_known_maps_ties_and_borders():
    a = torch.tensor([[[9.0, 1.0, 7.0], [2.0, 7.0, 3.0], [7.0, 0.0, 8.0]]])
    pts = top_k_points(a, 4, timeframe=2, step=50)
    # 9 at (0,0) corner, 8 at (2,2) corner, then the tie of 7s in row-major order: (0,2), (1,1)
    assert list(zip(pts.ys[0].tolist(), pts.xs[0].tolist())) == [(0, 0), (2, 2), (0, 2), (1, 1)]
    assert pts.values[0].tolist() == [9.0, 8.0, 7.0, 7.0]
    assert (pts.timeframe, pts.step) == (2, 50)
    with pytest.raises(ValueError):
        top_k_points(a, 10)


def test_buffer_keeps_the_last_L_timeframes():
    buf = TrajectoryBuffer(3)
    for t in range(5):
        buf.append(top_k_points(torch.rand(2, 4, 4), 2, timeframe=t))
    assert len(buf) == 3 and [p.timeframe for p in buf.frames] == [2, 3, 4]
    other = TrajectoryBuffer(1)
    other.load_state_dict(buf.state_dict())
    assert [p.timeframe for p in other.frames] == [2, 3, 4] and other.frames.maxlen == 3


def test_loss_is_zero_on_the_recorded_values_and_grad_reaches_the_student_only():
    connector_feats = torch.rand(2, 8, 4, 6, requires_grad=True)
    buf = TrajectoryBuffer(2)
    recorded = attention_map(connector_feats)
    buf.append(top_k_points(recorded, 5))
    # A student whose attention equals the recorded one has zero loss.
    assert trajectory_loss(recorded.detach().clone(), buf).item() == pytest.approx(0.0, abs=1e-7)
    student_feats = torch.rand(2, 16, 8, 12, requires_grad=True)
    loss = trajectory_loss(resize_attention(attention_map(student_feats), (4, 6)), buf)
    assert loss.item() > 0
    loss.backward()
    assert student_feats.grad is not None and student_feats.grad.abs().sum() > 0
    assert connector_feats.grad is None  # recorded values are constants


def test_loss_by_hand_and_empty_buffer():
    buf = TrajectoryBuffer(2)
    a = torch.tensor([[[0.0, 1.0], [0.5, 0.2]]])
    buf.append(top_k_points(a, 2))  # points (0,1)=1.0 and (1,0)=0.5
    s = torch.tensor([[[0.0, 0.8], [0.9, 0.0]]], requires_grad=True)
    assert trajectory_loss(s, buf).item() == pytest.approx((0.2 + 0.4) / 2)
    assert trajectory_loss(s, TrajectoryBuffer(1)).item() == 0.0


def test_rows_for_parquet():
    pts = top_k_points(torch.rand(3, 4, 4), 2, timeframe=1, step=7)
    r = rows(pts, "connector")
    assert len(r) == 3 * 2
    assert set(r[0]) == {"timeframe", "step", "image", "rank", "y", "x", "value", "source"}
    assert r[0]["source"] == "connector" and r[-1]["image"] == 2 and r[-1]["rank"] == 1


# ----------------------------------------------------------------------------- connector


def test_connector_fits_any_teacher_pair():
    seg_t = build_teacher("seg", "tiny", "light", 7)
    depth_t = build_teacher("depth", "resnet18", "light", 7)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        fs, fd = seg_t(x)["features"], depth_t(x)["features"]
    con = Connector([seg_t.feature_channels, depth_t.feature_channels], num_classes=7, hidden=32)
    out = con([fs, torch.nn.functional.avg_pool2d(fd, 2)], image_size=(64, 96))  # a coarser second grid
    assert out["features"].shape == (2, 32, 8, 12)
    assert out["seg"].shape == (2, 7, 64, 96) and out["depth"].shape == (2, 1, 64, 96)
    assert (out["depth"] > 0).all()


# ----------------------------------------------------------------------------- losses and the trained model
def test_kd_seg_by_hand_temperature_and_ignore():
    from jointdistill.distill.losses import kd_seg

    z = torch.randn(2, 3, 4, 5)
    assert kd_seg(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.randn(2, 3, 4, 5)
    by_hand = (p.softmax(1) * (p.log_softmax(1) - z.log_softmax(1))).sum(1).mean()
    assert kd_seg(z, p).item() == pytest.approx(by_hand.item(), rel=1e-5)
    t = 2.0
    by_hand_t = (p.div(t).softmax(1) * (p.div(t).log_softmax(1) - z.div(t).log_softmax(1))).sum(1).mean() * t * t
    assert kd_seg(z, p, temperature=t).item() == pytest.approx(by_hand_t.item(), rel=1e-5)
    label = torch.full((2, 4, 5), 255)
    label[0, 0, 0] = 1
    one = (p.softmax(1) * (p.log_softmax(1) - z.log_softmax(1))).sum(1)[0, 0, 0]
    assert kd_seg(z, p, label).item() == pytest.approx(one.item(), rel=1e-5)
    assert kd_seg(z, p, torch.full((2, 4, 5), 255)).item() == 0.0
    zs = z.clone().requires_grad_()
    pt = p.clone().requires_grad_()
    kd_seg(zs, pt).backward()
    assert zs.grad.abs().sum() > 0 and pt.grad is None  # soft targets are constants


def test_kd_depth_on_valid_pixels():
    from jointdistill.distill.losses import kd_depth

    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    c = torch.tensor([[[[1.5, 2.0], [1.0, 9.0]]]])
    gt = torch.tensor([[[[5.0, 0.0], [2.0, 0.0]]]])
    assert kd_depth(s, c).item() == pytest.approx((0.5 + 0 + 2 + 5) / 4)
    assert kd_depth(s, c, gt).item() == pytest.approx((0.5 + 2) / 2)
    assert kd_depth(s, c, torch.zeros_like(gt)).item() == 0.0


def test_kd_pixels_cover_every_pixel_of_an_unlabelled_image_only():
    from jointdistill.distill.objective import kd_pixels

    label = torch.tensor([[[0, 255], [2, 1]], [[255, 255], [255, 255]]])  # a labelled image, an unlabelled one
    depth = torch.tensor([[[[0.0, 3.0], [4.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    kd_label, kd_gt = kd_pixels(label, depth, 255, torch.full_like(depth, 5.0), 100.0)
    assert kd_label[0].tolist() == label[0].tolist()  # the labelled image keeps its ignored pixel out of KD
    assert (kd_label[1] != 255).all()
    assert kd_gt[0].tolist() == depth[0].tolist()
    assert (kd_gt[1] > 0).all()
    s = torch.zeros(2, 3, 2, 2)
    p = torch.randn(2, 3, 2, 2)
    from jointdistill.distill.losses import kd_depth, kd_seg

    # The unlabelled image alone: its KD terms are the plain means over all its pixels.
    assert kd_seg(s[1:], p[1:], kd_label[1:]).item() == pytest.approx(kd_seg(s[1:], p[1:]).item())
    sd, td = torch.full((1, 1, 2, 2), 2.0), torch.tensor([[[[1.0, 2.0], [4.0, 2.0]]]])
    assert kd_depth(sd, td, kd_gt[1:]).item() == pytest.approx(kd_depth(sd, td).item())
    assert kd_depth(sd, td, depth[1:]).item() == 0.0  # what the unmodified mask gave: no signal at all


def test_distill_model_hides_teachers_and_cycles_probes():
    from jointdistill.distill.model import DistillModel
    from jointdistill.models import build_student

    teachers = [build_teacher("seg", "tiny", "light", 7), build_teacher("depth", "tiny", "light", 7)]
    student = build_student("tiny", "light", 7)
    con = Connector([t.feature_channels for t in teachers], 7, hidden=16)
    probes = torch.randn(5, 3, 32, 48)
    m = DistillModel(student, con, teachers, probes, traj_every=2, traj_batch=2)
    names = {n for n, _ in m.named_parameters()}
    assert names and all(n.startswith(("student.", "connector.")) for n in names)
    assert all(k.startswith(("student.", "connector.", "steps")) for k in m.state_dict())
    assert all(not p.requires_grad for t in teachers for p in t.parameters())
    m = m.to(torch.float64)
    assert next(teachers[0].parameters()).dtype == torch.float64 and m.probes.dtype == torch.float64
    m = m.float()
    assert [m.probe_slice(s).tolist() for s in (0, 1, 2, 4, 6)] == [[0, 1], [0, 1], [2, 3], [4, 0], [1, 2]]
    m.train()
    x = torch.randn(2, 3, 32, 48)
    out = m(x)
    assert set(out) == {"student", "connector"} and m.teacher_images == 2 and int(m.steps) == 1
    assert not teachers[0].training  # frozen teachers stay in eval mode when the model trains
    m.trajectory_on = True
    m.steps.fill_(2)
    out = m(x)
    assert out["probe"]["index"].tolist() == [2, 3] and out["probe"]["features"].shape[0] == 2
    m.steps.fill_(3)
    assert "probe" not in m(x)  # traj_every = 2
    m.eval()
    assert set(m(x)) == {"features", "seg", "depth"}  # eval: the student alone


def test_probe_pass_leaves_batch_norm_statistics_alone():
    from jointdistill.distill.model import frozen_batchnorm
    from jointdistill.models import build_student

    student = build_student("tiny", "light", 7).train()
    bns = [m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [b.running_mean.clone() for b in bns]
    with frozen_batchnorm(student):
        student.encode(torch.randn(2, 3, 32, 48) * 5 + 3).sum().backward()
    assert all(torch.equal(a, b.running_mean) for a, b in zip(before, bns, strict=True))
    assert all(b.training for b in bns)
    student.encode(torch.randn(2, 3, 32, 48) * 5 + 3)
    assert not torch.equal(before[0], bns[0].running_mean)  # outside the block, training updates them


def test_student_and_connector_gradients_are_clipped_separately():
    from jointdistill.distill.model import DistillModel
    from jointdistill.models import build_student
    from jointdistill.training.engine import clip_gradients

    teachers = [build_teacher("seg", "tiny", "light", 7), build_teacher("depth", "tiny", "light", 7)]
    student = build_student("tiny", "light", 7)
    con = Connector([t.feature_channels for t in teachers], 7, hidden=16)
    m = DistillModel(student, con, teachers, torch.randn(2, 3, 32, 48))
    groups = m.clip_groups()
    assert {id(p) for g in groups for p in g} == {id(p) for p in m.parameters()}
    for p in student.parameters():
        p.grad = torch.full_like(p, 1e-4)
    for p in con.parameters():
        p.grad = torch.full_like(p, 10.0)  # a connector with huge gradients
    n_student = torch.sqrt(sum((p.grad**2).sum() for p in student.parameters())).item()
    norms = clip_gradients(m, 1.0)
    assert norms[0] == pytest.approx(n_student, rel=1e-3) and norms[1] > 1.0
    # The student's small gradient is untouched; the connector's is clipped to norm 1.
    assert all(torch.allclose(p.grad, torch.full_like(p, 1e-4)) for p in student.parameters())
    after = torch.sqrt(sum((p.grad**2).sum() for p in con.parameters())).item()
    assert after == pytest.approx(1.0, rel=1e-4)
    # A plain model (no clip_groups) is clipped as a whole.
    plain = build_student("tiny", "light", 7)
    for p in plain.parameters():
        p.grad = torch.ones_like(p)
    (total,) = clip_gradients(plain, 1.0)
    after = torch.sqrt(sum((p.grad**2).sum() for p in plain.parameters())).item()
    assert total > 1 and after == pytest.approx(1.0, rel=1e-4)
