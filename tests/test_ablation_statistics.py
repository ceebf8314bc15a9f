"""The ablation's statistics: t-intervals, paired differences and sign counts, the capacity gate per seed, mode
variants, and teachers reused across distill changes."""

import pytest
from scipy import stats

from jointdistill import ablation as ablate
from jointdistill.config import load_params

from .conftest import REPO


def _results(diffs, base=0.6):
    rows = []
    for seed, d in enumerate(diffs):
        for mode, shift in (("single", 0.1), ("mtl", 0.0), ("full", d)):
            rows.append(
                {
                    "seed": seed,
                    "mode": mode,
                    "miou": base + shift,
                    "pixacc": 0.9,
                    "abs_err": 2.5 - 10 * shift,
                    "rel_err": 0.1,
                    "delta_m": 100 * shift,
                }
            )
    return rows


def test_t_interval_matches_scipy():
    diffs = [0.3, -0.1, 0.5, 0.2, 0.4]
    mean, low, high = ablate.t_interval(diffs)
    ref = stats.t.interval(0.95, len(diffs) - 1, loc=sum(diffs) / 5, scale=stats.sem(diffs))
    assert (low, high) == pytest.approx(ref) and mean == pytest.approx(0.26)
    assert ablate.t_interval([0.5]) == (0.5, None, None)  # one seed resolves nothing
    (one,) = ablate.paired(_results([0.02]), ["single", "mtl", "full"])
    md = ablate.markdown(ablate.summarise(_results([0.02]), ["single", "mtl", "full"]), [0], [one])
    assert "| full − mtl | +2.00 [no interval] (1/1)" in md and md.rstrip().endswith("| no: one seed |")


def test_paired_differences_and_sign_counts():
    results = _results([0.01, 0.02, -0.005, 0.015, 0.01])
    (pair,) = ablate.paired(results, ["single", "mtl", "full"])
    assert (pair["a"], pair["b"], pair["seeds"]) == ("full", "mtl", 5)
    assert pair["miou"]["mean"] == pytest.approx(0.01) and pair["miou"]["better"] == 4
    assert pair["abs_err"]["mean"] == pytest.approx(-0.1) and pair["abs_err"]["better"] == 4  # lower is better
    assert pair["delta_m"]["low"] < pair["delta_m"]["mean"] < pair["delta_m"]["high"]
    md = ablate.markdown(ablate.summarise(results, ["single", "mtl", "full"]), range(5), [pair], ablate.gate(results))
    assert "| full − mtl | +1.00 [" in md and "(4/5)" in md
    # Variants pair with their own kind: full+deficit − adaptive+deficit, and with mtl.
    names = [
        (p["a"], p["b"])
        for p in ablate.paired(
            [{**r, "mode": m} for r in results if r["mode"] == "full" for m in ("full+deficit", "adaptive+deficit")]
            + [r for r in results if r["mode"] == "mtl"],
            ["mtl", "adaptive+deficit", "full+deficit"],
        )
    ]
    assert names == [("full+deficit", "adaptive+deficit"), ("full+deficit", "mtl")]


def test_gate_per_seed():
    ok = ablate.gate(_results([0.0] * 3))  # teachers 10 points and 40 % AbsErr better than mtl
    assert ok["passed"] and [r["passed"] for r in ok["seeds"]] == [True] * 3
    rows = _results([0.0] * 3)
    for r in rows:
        if r["mode"] == "single" and r["seed"] == 1:
            r["miou"] = 0.62  # only 2 points better on seed 1
    bad = ablate.gate(rows)
    assert not bad["passed"] and [r["passed"] for r in bad["seeds"]] == [True, False, True]
    assert bad["seeds"][1]["miou_points"] == pytest.approx(2.0)
    md = ablate.markdown(ablate.summarise(rows, ["single", "mtl"]), range(3), [], bad)
    assert "**FAILED**: this benchmark cannot show distillation" in md
    # Under a label budget the KD students also learn from unlabelled frames: a failed gate does not bound them.
    pooled = ablate.gate(rows, unlabelled=827)
    assert not pooled["passed"] and pooled["unlabelled"] == 827
    md = ablate.markdown(ablate.summarise(rows, ["single", "mtl"]), range(3), [], pooled)
    assert "**FAILED**; it does not bound distillation here" in md and "827 frames missing a task's label" in md
    assert "cannot show distillation" not in md


def test_modes_with_variants():
    assert ablate.parse_mode("full+deficit") == ("full", {"distill.feedback": "deficit"})
    assert ablate.parse_mode("adaptive+live+progress") == (
        "adaptive",
        {"distill.teacher_cache": False, "distill.feedback": "progress"},
    )
    assert ablate.parse_mode("mtl+noval") == ("mtl", {"distill.hold_out_val": False})
    assert ablate.parse_mode("adaptive+closed") == ("adaptive", {"distill.feedback_kind": "closed"})
    assert ablate.parse_mode("self_train") == ("self_train", {})
    for bad in ("mtl+cache", "single+deficit", "full+sideways", "eata", "full+noval", "self_train+deficit"):
        with pytest.raises(Exception, match="unknown mode"):
            ablate.parse_mode(bad)


def test_ablation_reuses_teachers_across_distill_changes():
    base = load_params(REPO / "params.yaml")
    key = ablate.teacher_key(base)
    assert ablate.teacher_key(ablate._with(base, **{"distill.alpha": 0.5, "distill.mode": "mtl"})) == key
    for change in ({"teacher.epochs": 3}, {"seed": 7}, {"prepare.height": 64}, {"augment.hflip": False}):
        assert ablate.teacher_key(ablate._with(base, **change)) != key, change


def test_each_seed_prepares_its_own_labelled_frames_once(tmp_path):
    """ablate without --data: seed S's data is OUT/runs/seed-S/prepared, prepared with that seed (which draws the
    labelled frames), reused while its params are the same."""
    from jointdistill.data.contract import verify_prepared

    from .conftest import TINY

    p = load_params(REPO / "params.yaml", [*TINY, "prepare.budget.seg=0.4"])
    a, b = ablate.seed_data(p, 0, tmp_path), ablate.seed_data(p, 1, tmp_path)
    assert a == tmp_path / "runs" / "seed-0" / "prepared" and b == tmp_path / "runs" / "seed-1" / "prepared"
    ma, mb = verify_prepared(a), verify_prepared(b)
    assert ma["seed"] == 0 and mb["seed"] == 1 and ma["params_digest"] != mb["params_digest"]
    assert ma["counts"]["test"] == mb["counts"]["test"]  # the same test split for every seed
    stamp = (a / "meta.json").stat().st_mtime_ns
    assert ablate.seed_data(p, 0, tmp_path) == a and (a / "meta.json").stat().st_mtime_ns == stamp  # reused
    changed = ablate._with(p, **{"prepare.budget.seg": 0.5})
    ablate.seed_data(changed, 0, tmp_path)
    assert verify_prepared(a)["params_digest"] == changed.digest("prepare")  # other params: prepared again
