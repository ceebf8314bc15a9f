"""engine.train_step and devices.compile_networks: what the GPU path relies on, checked on the CPU."""

import math
import sys

import pytest
import torch

from jointdistill.config import TeacherParams
from jointdistill.distill.connector import Connector
from jointdistill.distill.model import DistillModel
from jointdistill.models import build_student, build_teacher
from jointdistill.training import devices, engine
from jointdistill.training.objectives import SegObjective


def _batch(n=2, h=32, w=48):
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(n, 3, h, w, generator=g),
        "label": torch.randint(0, 7, (n, h, w), generator=g),
        "depth": torch.rand(n, h, w, generator=g) * 10 + 0.5,
    }


def _setup(**over):
    spec = TeacherParams(**over)
    torch.manual_seed(0)
    model = build_teacher("seg", "tiny", "light", 7)
    opt = engine.build_optimizer(model, spec)
    sched = engine.build_scheduler(opt, spec, 100)
    return model, spec, opt, sched, torch.amp.GradScaler("cpu", enabled=False)


def test_train_step_returns_floats_and_updates_weights():
    model, spec, opt, sched, scaler = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    loss, parts = engine.train_step(model, SegObjective(7), _batch(), opt, sched, scaler, spec, None)
    assert isinstance(loss, float) and math.isfinite(loss) and loss > 0
    assert list(parts) == ["seg_ce"] and parts["seg_ce"] == pytest.approx(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert sched.last_epoch == 1


class _NaNTask(SegObjective):
    def loss(self, outputs, batch):
        loss, parts = super().loss(outputs, batch)
        return loss * float("nan"), parts


def test_non_finite_loss_stops_before_any_weight_changes():
    """The host reads the loss after backward (one wait per step), still before the optimiser steps."""
    model, spec, opt, sched, scaler = _setup()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with pytest.raises(FloatingPointError, match=r"non-finite loss at epoch 3, step 7: \{'seg_ce': "):
        engine.train_step(model, _NaNTask(7), _batch(), opt, sched, scaler, spec, None, " at epoch 3, step 7")
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())
    assert sched.last_epoch == 0 and not opt.state  # no optimiser step, no schedule step


def test_one_host_read_per_step(monkeypatch):
    """Our code reads the loss and all its parts from the device together: one .tolist(), no .item()
    (the CPU optimiser's own reads of its step counters, host tensors, are not ours)."""
    model, spec, opt, sched, scaler = _setup()
    calls = {"item": 0, "tolist": 0}
    item, tolist = torch.Tensor.item, torch.Tensor.tolist

    def count(name, fn):
        def wrapped(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            calls[name] += "jointdistill" in caller
            return fn(self, *a, **k)

        return wrapped

    monkeypatch.setattr(torch.Tensor, "item", count("item", item))
    monkeypatch.setattr(torch.Tensor, "tolist", count("tolist", tolist))
    engine.train_step(model, SegObjective(7), _batch(), opt, sched, scaler, spec, None)
    assert calls == {"item": 0, "tolist": 1}


def test_compile_networks_covers_every_network_and_keeps_state_dict_keys():
    teachers = [build_teacher("seg", "tiny", "light", 7), build_teacher("depth", "tiny", "light", 7)]
    student = build_student("tiny", "light", 7)
    con = Connector([t.feature_channels for t in teachers], 7, hidden=16)
    model = DistillModel(student, con, teachers, torch.randn(2, 3, 32, 48))
    keys = list(model.state_dict())
    # student: backbone + 2 heads; each teacher: backbone + 1 head; the connector
    assert devices.compile_networks(model) == 3 + 2 + 2 + 1
    compiled = [
        m
        for m in (
            student.backbone,
            *student.heads.values(),
            con,
            *(x for t in teachers for x in (t.backbone, *t.heads.values())),
        )
    ]
    assert all(m._compiled_call_impl is not None for m in compiled)
    assert model._compiled_call_impl is None  # the glue stays eager
    assert list(model.state_dict()) == keys
    assert torch._dynamo.config.cache_size_limit >= 32  # room for every situation an encoder is compiled in


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [("auto", "cpu", False), ("auto", "cuda", True), ("on", "cpu", True), ("off", "cuda", False)],
)
def test_compile_setting(setting, device, expected):
    assert devices.use_compile(TeacherParams(compile=setting), torch.device(device)) is expected


def test_fused_adamw_only_on_cuda():
    model, spec, opt, *_ = _setup()
    assert not opt.defaults.get("fused")


def test_resume_drops_dvclive_rows_the_checkpoint_does_not_hold(tmp_path):
    """A run killed after logging validation 1 but before checkpointing it resumes with one validation in its
    history: the rows of steps ≥ 1 are dropped, so the re-logged step 1 is not a duplicate (0, 1, 1 → 0, 1)."""
    from jointdistill.training.checkpoints import prune_live

    live = tmp_path / "dvclive" / "plots" / "metrics" / "val"
    live.mkdir(parents=True)
    (live / "miou.tsv").write_text("timestamp\tstep\tmiou\n1\t0\t0.1\n2\t1\t0.2\n3\t2\t0.3\n")
    (live / "loss.tsv").write_text("timestamp\tstep\tloss\n1\t0\t1.0\n")
    prune_live(tmp_path / "dvclive", 1)
    assert (live / "miou.tsv").read_text() == "timestamp\tstep\tmiou\n1\t0\t0.1\n"
    assert (live / "loss.tsv").read_text() == "timestamp\tstep\tloss\n1\t0\t1.0\n"
