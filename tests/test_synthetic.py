import numpy as np
import pytest

from jointdistill.data.resize import nearest_indices
from jointdistill.data.sources.street_scenes import CLASSES, HUMAN, SKY, VEHICLE, SyntheticScenes


@pytest.fixture(scope="module")
def frames():
    g = SyntheticScenes(64, 128, seed=0)
    return [g.render(i) for i in range(24)]


@pytest.mark.parametrize("hw", [(48, 96), (128, 256), (37, 101)])
def test_shapes_dtypes_ranges(hw):
    image, label, depth = SyntheticScenes(*hw, seed=1).render(5)
    assert image.shape == (*hw, 3) and image.dtype == np.uint8
    assert label.shape == hw and label.dtype == np.uint8
    assert depth.shape == hw and depth.dtype == np.float32
    assert label.max() < len(CLASSES)
    assert np.isfinite(depth).all() and depth.min() >= 0 and depth.max() <= 100


def test_deterministic_per_seed_and_index():
    a = SyntheticScenes(48, 96, seed=7).render(11)
    b = SyntheticScenes(48, 96, seed=7).render(11)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    other_index = SyntheticScenes(48, 96, seed=7).render(12)
    other_seed = SyntheticScenes(48, 96, seed=8).render(11)
    assert not np.array_equal(a[2], other_index[2])
    assert not np.array_equal(a[2], other_seed[2])


def test_rendering_order_does_not_matter():
    g = SyntheticScenes(48, 96, seed=2)
    first = g.render(3)
    g.render(9)
    again = g.render(3)
    np.testing.assert_array_equal(first[0], again[0])


def test_sky_is_the_only_invalid_depth_near_the_camera(frames):
    for _, label, depth in frames:
        assert (depth[label == SKY] == 0).all()
        # non-sky pixels are valid unless farther than max_depth (open streets)
        invalid = (depth == 0) & (label != SKY)
        assert invalid.mean() < 0.1


def test_every_class_appears_in_most_frames(frames):
    present = np.array([[np.any(label == c) for c in range(len(CLASSES))] for _, label, _ in frames])
    share = present.mean(0)
    assert (share >= 0.5).all(), dict(zip(CLASSES, share.round(2)))


def test_objects_appear_at_many_depths(frames):
    for cls in (HUMAN, VEHICLE):
        medians = [np.median(d[lb == cls]) for _, lb, d in frames if (lb == cls).sum() > 3]
        assert min(medians) < 12 and max(medians) > 25, (CLASSES[cls], medians)


def test_depth_is_not_a_function_of_row(frames):
    # Below the horizon a flat world would give one depth per row; objects must break that.
    spread = []
    for _, _, depth in frames:
        rows = depth[32:]
        valid = rows > 0
        for r in range(rows.shape[0]):
            v = rows[r][valid[r]]
            if v.size > 10:
                spread.append(v.std() / v.mean())
    assert np.median(spread) > 0.1


def test_objects_occlude_each_other(frames):
    # A vehicle or person in front of a building: its depth is smaller than the façade right next to it.
    found = 0
    for _, label, depth in frames:
        for cls in (HUMAN, VEHICLE):
            mask = label == cls
            right = np.zeros_like(mask)
            right[:, 1:] = mask[:, :-1] & (label[:, 1:] == 1)  # construction pixel right of an object pixel
            ys, xs = np.nonzero(right)
            if ys.size:
                found += int(np.mean(depth[ys, xs - 1] < depth[ys, xs]) > 0.9)
    assert found >= 5


def test_images_have_texture_noise_and_lighting_variety(frames):
    means = [img.mean() for img, _, _ in frames]
    assert np.std(means) > 3  # exposure and scene vary
    img, label, _ = frames[0]
    for c in range(len(CLASSES)):
        px = img[label == c]
        if px.shape[0] > 50:
            assert px.std() > 2  # not flat-shaded


def test_same_scene_at_two_resolutions():
    lo = SyntheticScenes(64, 128, seed=0).render(4)[1]
    hi = SyntheticScenes(128, 256, seed=0).render(4)[1]
    down = hi[np.ix_(nearest_indices(128, 64), nearest_indices(256, 128))]
    assert (down == lo).mean() > 0.9


def test_too_small_raises():
    with pytest.raises(ValueError):
        SyntheticScenes(4, 4)
