import numpy as np
import pytest

from jointdistill.config import PrepareParams
from jointdistill.data.sample import Sample, SampleRef
from jointdistill.data.sources.synthetic import SyntheticSource
from jointdistill.data.split import assign_splits, hash_fraction
from jointdistill.data.validate import validate_sample
from jointdistill.errors import DataError


def refs(n, test_every=0):
    return [SampleRef(f"s{i:05d}", "test" if test_every and i % test_every == 0 else "train") for i in range(n)]


def test_hash_fraction_is_deterministic_and_uniform():
    assert hash_fraction("a", 0, "val") == hash_fraction("a", 0, "val")
    assert hash_fraction("a", 0, "val") != hash_fraction("a", 1, "val")
    xs = np.array([hash_fraction(f"id{i}", 0, "val") for i in range(4000)])
    assert 0 <= xs.min() and xs.max() < 1
    assert abs(xs.mean() - 0.5) < 0.02


def test_val_is_fifteen_percent_of_source_train_and_test_is_source_test():
    s = assign_splits(refs(3000, test_every=5), 0.15, seed=0)
    train_pool = len(s["train"]) + len(s["val"])
    assert len(s["test"]) == 600 and train_pool == 2400
    assert abs(len(s["val"]) / train_pool - 0.15) < 0.02
    assert all(r.source_split == "test" for r in s["test"])


def test_adding_samples_never_moves_old_ones():
    small = assign_splits(refs(500), 0.15, seed=3)
    big = assign_splits(refs(2000), 0.15, seed=3)
    where_big = {r.sample_id: split for split, rs in big.items() for r in rs}
    for split, rs in small.items():
        assert all(where_big[r.sample_id] == split for r in rs)


def test_seed_changes_the_split():
    a = {r.sample_id for r in assign_splits(refs(500), 0.15, seed=0)["val"]}
    b = {r.sample_id for r in assign_splits(refs(500), 0.15, seed=1)["val"]}
    assert a != b


def test_synthetic_test_split_is_stable_when_growing():
    small = SyntheticSource(PrepareParams(num_samples=100, height=16, width=16), seed=0).list()
    big = SyntheticSource(PrepareParams(num_samples=400, height=16, width=16), seed=0).list()
    assert [r.source_split for r in small] == [r.source_split for r in big[:100]]
    share = np.mean([r.source_split == "test" for r in big])
    assert 0.08 < share < 0.22


def good(h=8, w=10, sid="x"):
    return Sample(sid, np.zeros((h, w, 3), np.uint8), np.ones((h, w), np.uint8), np.full((h, w), 5.0, np.float32))


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda s: setattr(s, "image", np.zeros((8, 10), np.uint8)), "image must be H×W×3 RGB, got shape 8×10"),
        (lambda s: setattr(s, "image", np.zeros((8, 10, 4), np.uint8)), "got shape 8×10×4"),
        (lambda s: setattr(s, "image", np.zeros((8, 10, 3), np.float32)), "image must be uint8, got float32"),
        (lambda s: setattr(s, "label", np.ones((8, 9), np.uint8)), "sizes differ: image 8×10, label 8×9"),
        (lambda s: setattr(s, "depth", np.ones((7, 10), np.float32)), "depth 7×10"),
        (lambda s: setattr(s, "label", np.full((8, 10), 7, np.uint8)), "label ids outside the class table (0..6"),
        (lambda s: setattr(s, "label", np.full((8, 10), -1, np.int16)), ": -1"),
        (lambda s: setattr(s, "label", np.ones((8, 10), np.float32)), "label must hold integer class ids"),
        (lambda s: setattr(s, "depth", np.ones((8, 10), np.uint16)), "depth must be floating-point metres"),
        (lambda s: setattr(s, "depth", np.ones((8, 10, 1), np.float32)), "depth must be H×W"),
        (lambda s: setattr(s, "image", np.zeros((0, 10, 3), np.uint8)), "image is empty"),
        (lambda s: setattr(s, "label", None), "label is NoneType, not an array"),
    ],
)
def test_structural_problems_raise_naming_the_sample(mutate, fragment):
    s = good(sid="frame-042")
    mutate(s)
    with pytest.raises(DataError) as err:
        validate_sample(s, num_classes=7)
    assert str(err.value).startswith("sample frame-042: ")
    assert fragment in str(err.value)


def test_ignore_index_is_allowed():
    s = good()
    s.label[0, 0] = 255
    out, _ = validate_sample(s, num_classes=7)
    assert out.label[0, 0] == 255


def test_bad_depth_is_masked_and_counted():
    s = good(sid="d1")
    s.depth[0, :3] = np.nan
    s.depth[1, 0] = np.inf
    s.depth[2, :2] = -1
    s.depth[3, 0] = 500
    out, counts = validate_sample(s, num_classes=7, max_depth=100)
    assert (counts.nan, counts.inf, counts.negative, counts.beyond_range) == (3, 1, 2, 1)
    assert counts.samples_affected == ["d1"]
    assert out.depth.dtype == np.float32 and np.isfinite(out.depth).all()
    assert (out.depth == 0).sum() == 7 and out.depth.max() == 5.0


def test_bad_depth_can_be_an_error():
    s = good(sid="d2")
    s.depth[0, 0] = np.nan
    with pytest.raises(DataError, match=r"sample d2: invalid depth pixels: 1 NaN"):
        validate_sample(s, num_classes=7, invalid_depth="error")
