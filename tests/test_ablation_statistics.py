"""The ablation's statistics: t-intervals, paired differences and sign counts, the capacity gate per seed, mode
variants, and teachers reused across distill changes."""

import json

import pytest
from scipy import stats

from jointdistill import ablation as ablate
from jointdistill.config import load_params
from jointdistill.errors import ConfigError

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
    assert ablate.teacher_key(ablate.with_changes(base, **{"distill.alpha": 0.5, "distill.mode": "static_kd"})) == key
    for change in ({"teacher.epochs": 3}, {"seed": 7}, {"prepare.height": 64}, {"augment.hflip": False}):
        assert ablate.teacher_key(ablate.with_changes(base, **change)) != key, change


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
    changed = ablate.with_changes(p, **{"prepare.budget.seg": 0.5})
    ablate.seed_data(changed, 0, tmp_path)
    assert verify_prepared(a)["params_digest"] == changed.digest("prepare")  # other params: prepared again


def test_a_grid_is_every_combination_paired_against_the_params_values():
    base = load_params(REPO / "params.yaml", ["distill.mode=full"])
    grid = ablate.parse_vary(["distill.alpha=0,1", "distill.top_k=5,10"])
    assert grid == {"distill.alpha": [0, 1], "distill.top_k": [5, 10]}
    variants, reference = ablate.grid_variants(base, grid)
    # params' own values (alpha 1.5, top_k 10) are not in the grid: the reference comes first, then the four points.
    assert reference == "distill.alpha=1.5,distill.top_k=10" == variants[0].name
    assert [v.name for v in variants[1:]] == [
        "distill.alpha=0,distill.top_k=5",
        "distill.alpha=0,distill.top_k=10",
        "distill.alpha=1,distill.top_k=5",
        "distill.alpha=1,distill.top_k=10",
    ]
    assert variants[2].changes == {"distill.alpha": 0, "distill.top_k": 10} and all(v.student for v in variants)
    inside, ref = ablate.grid_variants(base, ablate.parse_vary(["distill.alpha=0,1.5"]))
    assert [v.name for v in inside] == ["distill.alpha=0", "distill.alpha=1.5"] and ref == "distill.alpha=1.5"
    for bad, match in (
        (["distill.alpha"], "expected KEY=V1,V2"),
        (["distill.alpha=1,,2"], "expected KEY=V1,V2"),
        (["distill.alpha=1", "distill.alpha=2"], "given twice"),
        (["distill.alfa=1,2"], "unknown params key"),
        (["prepare.budget.sky=1,2"], "unknown params key"),
    ):
        with pytest.raises(Exception, match=match):
            ablate.grid_variants(base, ablate.parse_vary(bad))
    with pytest.raises(Exception, match="distill.alpha"):  # a value params cannot take fails before any training
        ablate.grid_variants(base, ablate.parse_vary(["distill.alpha=fast,1"]))
    # A key no point's mode reads would give one student per value: refused, unless a point's mode reads it.
    mtl = ablate.with_changes(base, **{"distill.mode": "mtl"})
    with pytest.raises(ConfigError, match="--vary: distill.top_k is not read in distill.mode mtl"):
        ablate.grid_variants(mtl, ablate.parse_vary(["distill.top_k=5,10"]))
    mixed, _ = ablate.grid_variants(mtl, ablate.parse_vary(["distill.top_k=5,10", "distill.mode=mtl,full"]))
    assert len(mixed) == 4


def test_one_key_at_a_time_shares_one_reference_and_plots_each_key(tmp_path):
    """A sensitivity sweep (--one-at-a-time): each key alone around params' values, paired against one shared
    reference row (params' own values are not trained twice); a paired-KEY.png per key."""
    base = load_params(REPO / "params.yaml", ["distill.mode=full"])
    grid = ablate.parse_vary(["distill.alpha=0,1.5,2", "distill.top_k=5,10,20"])
    variants, reference = ablate.plan(base, vary=grid, each=True)
    assert reference == ablate.REFERENCE == variants[0].name
    assert variants[0].changes == {"distill.alpha": 1.5, "distill.top_k": 10}
    names = [v.name for v in variants[1:]]
    assert names == ["distill.alpha=0", "distill.alpha=2", "distill.top_k=5", "distill.top_k=20"]
    assert variants[3].changes == {"distill.top_k": 5}  # the other key stays at params' value
    rows = [
        {"seed": s, "mode": n, **dict.fromkeys(ablate.COLUMNS[:4], 1.0), "delta_m": d + s, "val_mt_score": 0.5}
        for s in (0, 1, 2)
        for n, d in zip([reference, *names], [0.0, 1.0, -1.0, 0.5, 2.0], strict=True)
    ]
    ablate.aggregate(tmp_path, rows, [reference, *names], [0, 1, 2], reference=reference)
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert [(p["a"], p["b"]) for p in saved["pairs"]] == [(n, "reference") for n in names]
    assert saved["pairs"][1]["delta_m"]["mean"] == pytest.approx(-1.0)
    assert "paired against reference (params' values)" in (tmp_path / "ablation.md").read_text()
    assert sorted(p.name for p in tmp_path.glob("paired-*.png")) == [
        "paired-distill.alpha.png",
        "paired-distill.top_k.png",
    ]
    # A grid of combinations, or one key, has no per-key plots: paired.png is the plot.
    one, _ = ablate.plan(base, vary={"distill.alpha": [0, 1.5]}, each=True)
    assert [v.name for v in one] == ["reference", "distill.alpha=0"]
    assert ablate._by_key([{"a": "distill.alpha=0", "b": "reference"}]) == {}
    assert ablate._by_key([{"a": "distill.alpha=0,distill.top_k=5", "b": "distill.alpha=1.5,distill.top_k=10"}]) == {}


def test_stated_pairs_follow_the_variants():
    modes = ["single", "mtl", "self_train", "static_kd", "adaptive", "adaptive+deficit", "full", "mtl+noval"]
    assert ablate.stated_pairs(modes) == [
        ("static_kd", "mtl"),
        ("static_kd", "self_train"),
        ("adaptive", "static_kd"),
        ("adaptive+deficit", "static_kd"),
        ("full", "adaptive"),
        ("full", "mtl"),
        ("mtl+noval", "mtl"),
    ]
    assert ablate.stated_pairs(["mtl", "full+deficit", "adaptive+deficit"]) == [
        ("full+deficit", "adaptive+deficit"),
        ("full+deficit", "mtl"),
    ]


def test_aggregate_writes_the_table_from_rows_alone(tmp_path):
    """The aggregation any driver (ablate in-process, or one that gathers rows elsewhere) calls."""
    rows = _results([0.02, 0.03, 0.01])
    table = ablate.aggregate(tmp_path, rows, ["single", "mtl", "full"], [0, 1, 2])
    assert [r["mode"] for r in table] == ["single", "mtl", "full"] and table[2]["seeds"] == 3
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert [(p["a"], p["b"]) for p in saved["pairs"]] == [("full", "mtl")]  # the stated pairs present
    assert saved["pairs"][0]["delta_m"]["mean"] == pytest.approx(2.0) and saved["pairs"][0]["delta_m"]["better"] == 3
    assert [g["seed"] for g in saved["gate"]["seeds"]] == [0, 1, 2]
    md = (tmp_path / "ablation.md").read_text()
    assert "| full − mtl | +2.00 [" in md and "(3/3)" in md
    for name in ("ablation.csv", "runs.csv", "ablation.png", "paired.png"):
        assert (tmp_path / name).stat().st_size > 0
