"""The adaptive teacher weights ω: task scores, the feedback rules (level, rate, closed) and their noise scaling, the
update by hand, α, clipping, the history; replayed feedback: signal moves ω beyond its noise band, noise does not."""

import math
import random

import pytest

from jointdistill.distill.weights import (
    RateRule,
    Signal,
    TeacherWeights,
    feedback,
    gap_noise,
    relative_z,
    targets,
    task_score,
    update,
    z_targets,
)


def _fixed_point(a, alpha, steps=200, **kw):
    w = {"seg": 1.0, "depth": 1.0}
    for _ in range(steps):
        w = update(w, a, alpha=alpha, beta=0.5, **kw)
    return w


def test_scores_and_feedback():
    assert task_score("seg", {"miou": 0.6}) == 0.6
    assert task_score("depth", {"abs_err": 4.0, "delta1": 0.8}) == 0.8  # δ<1.25: the relative scale, not metres
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
    a = feedback({"seg": 0.0, "depth": task_score("depth", {"delta1": 0.0})}, {"seg": 0.0, "depth": 1.0})
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
    row = tw.history[0]
    assert {k: row[k] for k in ("timeframe", "step", "task", "score", "noise", "z")} == {
        "timeframe": 1,
        "step": 100,
        "task": "seg",
        "score": 0.3,
        "noise": "",
        "z": "",
    }
    assert row["feedback"] == pytest.approx(0.5) and row["omega"] == pytest.approx(w1["seg"])
    static = TeacherWeights(("seg", "depth"), {"seg": 0.6, "depth": 0.25}, 1.5, 0.5, adaptive=False)
    assert static.step(1, 10, {"seg": 0.1, "depth": 0.9}) == {"seg": 1.0, "depth": 1.0}
    again = TeacherWeights(("seg", "depth"), {"seg": 0.6, "depth": 0.25}, 1.5, 0.5)
    again.load_state_dict(tw.state_dict())
    assert again.weights == tw.weights and again.history == tw.history


# ----------------------------------------------------------------------------- the noise-scaled rules
TEACHER = {"seg": 0.6, "depth": 0.9}


def _replay(kind, closing, noise, seed, timeframes=21, direction="progress", alpha=1.5, band=1.0):
    """ω over a run whose log gap to each teacher starts at (1.0, 0.6) and closes by ``closing[task]`` per
    timeframe, each val score jittered by ``noise`` (log scale)."""
    rng = random.Random(seed)
    tw = TeacherWeights(("seg", "depth"), TEACHER, alpha, 0.5, kind=kind, band=band, direction=direction)
    gap = {"seg": 1.0, "depth": 0.6}
    omegas = []
    for t in range(timeframes):
        scores = {k: TEACHER[k] * math.exp(-(gap[k] + rng.gauss(0, noise))) for k in gap}
        omegas.append(tw.step(t + 1, 50 * (t + 1), scores)["seg"])
        gap = {k: max(gap[k] - closing[k], 0.05) for k in gap}
    return omegas, tw


def _default_timeframes():
    from jointdistill.config import load_params

    from .conftest import REPO

    p = load_params(REPO / "params.yaml")
    frames = round(p.prepare.num_samples * (1 - p.prepare.test_fraction) * (1 - p.prepare.val_fraction))
    return p.distill.epochs * (frames // p.distill.batch_size) // p.distill.timeframe_steps


def _moves(closing, t, direction="progress", runs=100):
    """Over ``runs`` replays: the largest |ω_seg − 1| of each, sorted, and the mean final ω_seg."""
    out = [_replay("rate", closing, 0.02, s, t, direction)[0] for s in range(runs)]
    return sorted(max(abs(w - 1) for w in o) for o in out), sum(o[-1] for o in out) / runs


def test_a_task_whose_gap_closes_faster_moves_omega_beyond_the_noise_band():
    t = _default_timeframes()
    noise, _ = _moves({"seg": 0.0, "depth": 0.0}, t)
    band = noise[89]  # how far pure noise moves ω in 9 runs of 10
    for direction, sign in (("progress", 1), ("deficit", -1)):
        moved, final = _moves({"seg": 0.03, "depth": 0.005}, t, direction)
        assert moved[10] > band, (direction, moved[10], band)  # in 9 runs of 10, beyond the band
        assert sign * (final - 1) > 0.3, (direction, final)  # towards the faster task (progress), or away


def test_pure_noise_does_not_move_omega():
    t = _default_timeframes()
    for closing in ({"seg": 0.0, "depth": 0.0}, {"seg": 0.01, "depth": 0.01}):  # no signal, or the same pace
        moved, final = _moves(closing, t)
        assert moved[50] < 0.01 and moved[89] < 0.3, (closing, moved[50], moved[89])  # most runs: not at all
        assert abs(final - 1) < 0.03


def test_alpha_0_is_static_for_every_kind():
    for kind in ("level", "rate", "closed"):
        omegas, tw = _replay(kind, {"seg": 0.04, "depth": 0.0}, 0.01, 0, alpha=0.0)
        assert omegas == pytest.approx([1.0] * len(omegas)), kind
        assert [h["feedback"] for h in tw.history if h["task"] == "seg"][-1] != 0  # the signal was there


def test_the_signal_is_measured_in_units_of_its_noise():
    # rate: the mean of the last k steps of the gap over the noise of such a mean (one step's SD / √k)
    gaps = [1.0, 0.9, 0.82, 0.7, 0.62, 0.5]
    steps = [a - b for a, b in zip(gaps[:-1], gaps[1:])]
    sd = math.sqrt(sum((x - sum(steps) / 5) ** 2 for x in steps) / 4)
    assert gap_noise(gaps, 5) == pytest.approx(sd)
    history = {"seg": [0.6 * math.exp(-g) for g in gaps], "depth": [0.9 * math.exp(-0.5)] * 6}
    sig = RateRule(1.5, "progress", window=5).signals(history, TEACHER)
    assert sig["seg"].value == pytest.approx(0.1) and sig["seg"].noise == pytest.approx(sd / math.sqrt(5))
    assert sig["depth"].value == pytest.approx(0.0) and sig["depth"].noise == pytest.approx(1e-3 / math.sqrt(5))
    # the same signal in twice the noise weighs half as much
    a = relative_z({"seg": Signal(0.1, 0.02), "depth": Signal(0.0, 0.02)})
    b = relative_z({"seg": Signal(0.1, 0.04), "depth": Signal(0.0, 0.04)})
    assert a["seg"] == pytest.approx(2 * b["seg"]) and a["seg"] == pytest.approx(-a["depth"])
    # no estimate of the noise yet (fewer than three steps): ω holds
    assert relative_z({"seg": Signal(0.1, None), "depth": Signal(0.0, 0.02)}) == {"seg": 0.0, "depth": 0.0}
    # inside the band nothing moves; beyond it, by the excess
    assert z_targets({"seg": 0.9, "depth": -0.9}, 1.5, band=1.0) == pytest.approx({"seg": 1.0, "depth": 1.0})
    t = z_targets({"seg": 1.5, "depth": -1.5}, 1.0, band=1.0)
    assert t["seg"] / t["depth"] == pytest.approx(math.exp(1.0)) and sum(t.values()) == pytest.approx(2.0)
    assert z_targets({"seg": 1.5, "depth": -1.5}, 1.0, "deficit", band=1.0)["seg"] == pytest.approx(t["depth"])


def test_closed_share_and_its_log():
    omegas, tw = _replay("closed", {"seg": 0.03, "depth": 0.005}, 0.01, 0)
    seg = [h for h in tw.history if h["task"] == "seg"]
    assert seg[0]["feedback"] == 0.0 and seg[-1]["feedback"] > 0.3  # seg closes most of its gap
    assert seg[0]["noise"] == "" and seg[-1]["noise"] > 0 and seg[-1]["z"] != ""
    assert omegas[-1] > 1.2
    with pytest.raises(ValueError, match="unknown feedback kind"):
        TeacherWeights(("seg",), {"seg": 1.0}, 1.0, 0.5, kind="vibes")


def test_the_report_plots_feedback_noise_and_z(tmp_path):
    from PIL import Image

    from jointdistill.evaluation import plots

    _, tw = _replay("rate", {"seg": 0.03, "depth": 0.005}, 0.02, 0)
    rows = [
        {"timeframe": 0, "step": 0, "task": t, "score": "", "feedback": "", "noise": "", "z": "", "omega": 1.0}
        for t in ("seg", "depth")
    ]
    path = plots.teacher_weights(rows + tw.history, tmp_path / "w.png")
    with Image.open(path) as im:
        wide = im.size
    level = plots.teacher_weights(
        rows + _replay("level", {"seg": 0.03, "depth": 0.0}, 0.02, 0)[1].history, tmp_path / "l.png"
    )
    with Image.open(level) as im:
        assert wide[0] > im.size[0] * 1.3  # a third panel (z) where the rule has a noise
