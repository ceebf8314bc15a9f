"""The adaptive teacher weights ω: task scores, the feedback, the update rule by hand, α, clipping, the history."""

import math

import pytest

from jointdistill.distill.weights import TeacherWeights, feedback, targets, task_score, update


def _fixed_point(a, alpha, steps=200, **kw):
    w = {"seg": 1.0, "depth": 1.0}
    for _ in range(steps):
        w = update(w, a, alpha=alpha, beta=0.5, **kw)
    return w


def test_scores_and_feedback():
    assert task_score("seg", {"miou": 0.6}) == 0.6
    assert task_score("depth", {"abs_err": 4.0}) == 0.25
    a = feedback({"seg": 0.3, "depth": 1 / 8}, {"seg": 0.6, "depth": 1 / 4})
    assert a == pytest.approx({"seg": 0.5, "depth": 0.5})


def test_equal_feedback_keeps_equal_weights():
    w = {"seg": 1.0, "depth": 1.0}
    for a in (0.2, 1.0, 3.0):
        assert update(w, {"seg": a, "depth": a}, alpha=1.5, beta=0.5) == pytest.approx(w)


def test_one_step_by_hand_alpha_1_5():
    # mean ω = 1, ā = 0.75; targets (0.5/0.75)^1.5 = 0.5443311, (1/0.75)^1.5 = 1.5396007
    # ω_seg = 1 − 0.5·(1 − 0.5443311) = 0.7721655, ω_depth = 1 − 0.5·(1 − 1.5396007) = 1.2698004
    # renormalised to sum 2: × 2 / 2.0419659
    out = update({"seg": 1.0, "depth": 1.0}, {"seg": 0.5, "depth": 1.0}, alpha=1.5, beta=0.5)
    assert out["seg"] == pytest.approx(0.7721655 * 2 / 2.0419659, abs=1e-6)
    assert out["depth"] == pytest.approx(1.2698004 * 2 / 2.0419659, abs=1e-6)
    assert out["seg"] < 1 < out["depth"]  # progress: the task further behind its teacher gets the smaller target
    assert sum(out.values()) == pytest.approx(2.0)


def test_deficit_direction_mirrors_progress():
    # deficit: target_i = ω̄·(ā / a_i)^α, so the lagging task gets the larger weight; here by hand with α = 1:
    # targets 1.5 / 0.75 → ω 1.25 / 0.875 → × 2 / 2.125
    out = update({"seg": 1.0, "depth": 1.0}, {"seg": 0.5, "depth": 1.0}, alpha=1.0, beta=0.5, direction="deficit")
    assert out == pytest.approx({"seg": 1.25 * 2 / 2.125, "depth": 0.875 * 2 / 2.125})
    assert targets({"seg": 1.0, "depth": 1.0}, {"seg": 0.5, "depth": 1.0}, 1.0, "deficit") == pytest.approx(
        {"seg": 1.5, "depth": 0.75}
    )
    with pytest.raises(ValueError, match="unknown feedback direction"):
        targets({"seg": 1.0}, {"seg": 1.0}, 1.0, "sideways")


def test_alpha_changes_the_fixed_point():
    a = {"seg": 0.6, "depth": 1.0}
    spread = {alpha: _fixed_point(a, alpha)["depth"] - _fixed_point(a, alpha)["seg"] for alpha in (0.5, 1.0, 1.5, 2.0)}
    # The larger α, the further the weights move from equal (the literal reading gave nearly the same point).
    assert spread[0.5] < spread[1.0] < spread[1.5] < spread[2.0]
    assert spread[2.0] - spread[0.5] > 0.4


def test_alpha_0_is_static():
    for direction in ("progress", "deficit"):
        for a in ({"seg": 0.6, "depth": 1.0}, {"seg": 0.1, "depth": 3.0}):
            w = {"seg": 1.0, "depth": 1.0}
            for _ in range(30):
                w = update(w, a, alpha=0.0, beta=0.5, direction=direction)
            assert w == pytest.approx({"seg": 1.0, "depth": 1.0})


def test_feedback_moves_omega_by_a_quarter_within_the_default_runs_timeframes():
    """Feedback (0.6, 1.0) at α = 1.5 (β = 0.5) moves ω by ≥ 25 % within the timeframes of a default run."""
    from jointdistill.config import load_params

    from .conftest import REPO

    p = load_params(REPO / "params.yaml")
    cfg = p.distill
    train = round(p.prepare.num_samples * (1 - p.prepare.test_fraction) * (1 - p.prepare.val_fraction))
    timeframes = cfg.epochs * (train // cfg.batch_size) // cfg.timeframe_steps
    assert timeframes >= 20, "a default run must have ≥ 20 timeframes"
    for direction in ("progress", "deficit"):
        w = {"seg": 1.0, "depth": 1.0}
        moved = 0
        for t in range(timeframes):
            w = update(w, {"seg": 0.6, "depth": 1.0}, cfg.alpha, cfg.beta, cfg.weight_min, cfg.weight_max, direction)
            if moved == 0 and max(abs(v - 1.0) for v in w.values()) >= 0.25:
                moved = t + 1
        assert moved and moved <= timeframes, direction


def test_alpha_1_vs_2_by_hand():
    w, a = {"seg": 1.0, "depth": 1.0}, {"seg": 0.5, "depth": 1.0}
    # α = 1: targets 2/3 and 4/3 → ω 5/6 and 7/6 (sum 2 already)
    assert update(w, a, alpha=1.0, beta=0.5) == pytest.approx({"seg": 5 / 6, "depth": 7 / 6})
    # α = 2: targets 4/9 and 16/9 → ω 13/18 and 25/18 → × 2 / (38/18)
    assert update(w, a, alpha=2.0, beta=0.5) == pytest.approx({"seg": 13 / 19, "depth": 25 / 19})


def test_clipping_then_renormalising():
    out = update({"seg": 1.0, "depth": 1.0}, {"seg": 0.25, "depth": 1.75}, alpha=1.0, beta=0.5, w_min=0.5, w_max=1.2)
    # targets 0.25 and 1.75 → 0.625 and 1.375; clipped to 0.625 and 1.2; rescaled to sum 2
    assert out == pytest.approx({"seg": 0.625 * 2 / 1.825, "depth": 1.2 * 2 / 1.825})


def test_zero_scores_give_no_nan():
    out = update({"seg": 1.0, "depth": 1.0}, {"seg": 0.0, "depth": 0.0}, alpha=0.5, beta=0.5)
    assert all(math.isfinite(v) for v in out.values()) and out == pytest.approx({"seg": 1.0, "depth": 1.0})
    a = feedback({"seg": 0.0, "depth": task_score("depth", {"abs_err": 0.0})}, {"seg": 0.0, "depth": 1.0})
    assert all(math.isfinite(v) for v in a.values())
    for direction in ("progress", "deficit"):
        assert all(
            math.isfinite(v) for v in update({"seg": 1.0, "depth": 1.0}, a, 1.5, 0.5, direction=direction).values()
        )


def test_teacher_weights_history_and_static_mode():
    tw = TeacherWeights(("seg", "depth"), {"seg": 0.6, "depth": 0.25}, alpha=1.5, beta=0.5)
    w1 = tw.step(1, 100, {"seg": 0.3, "depth": 0.25})
    assert w1["seg"] < w1["depth"]
    assert [h["task"] for h in tw.history] == ["seg", "depth"]
    assert tw.history[0] == pytest.approx(
        {"timeframe": 1, "step": 100, "task": "seg", "feedback": 0.5, "omega": w1["seg"]}
    )
    static = TeacherWeights(("seg", "depth"), {"seg": 0.6, "depth": 0.25}, 1.5, 0.5, adaptive=False)
    assert static.step(1, 10, {"seg": 0.1, "depth": 0.9}) == {"seg": 1.0, "depth": 1.0}
    again = TeacherWeights(("seg", "depth"), {"seg": 0.6, "depth": 0.25}, 1.5, 0.5)
    again.load_state_dict(tw.state_dict())
    assert again.weights == tw.weights and again.history == tw.history
