"""Metrics: hand-computed cases always, medpy's numbers where medpy is installed."""
import numpy as np
import pytest

import bcp_minimal as bm


def _cube(shape, lo, hi):
    a = np.zeros(shape, bool)
    a[tuple(slice(l, h) for l, h in zip(lo, hi))] = True
    return a


def test_dice_jaccard_hand():
    a = _cube((10, 10, 10), (0, 0, 0), (4, 4, 4))  # 64 voxels
    b = _cube((10, 10, 10), (2, 0, 0), (6, 4, 4))  # 64 voxels, overlap 32
    assert bm.dice(a, b) == pytest.approx(2 * 32 / 128)
    assert bm.jaccard(a, b) == pytest.approx(32 / 96)
    assert bm.dice(a, a) == 1.0 and bm.jaccard(a, a) == 1.0


def test_distances_hand():
    # two single voxels 3 apart along x: every surface distance is 3
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros((10, 10, 10), bool)
    a[1, 5, 5] = b[4, 5, 5] = True
    assert bm.hd95(a, b) == pytest.approx(3.0)
    assert bm.asd(a, b) == pytest.approx(3.0)
    assert bm.hd95(a, b, spacing=(2.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert bm.hd95(a, a) == 0.0


def test_empty_prediction_is_a_failure():
    gt = _cube((10, 12, 8), (2, 2, 2), (5, 5, 5))
    empty = np.zeros_like(gt)
    worst = np.sqrt(9**2 + 11**2 + 7**2)
    assert bm.dice(empty, gt) == 0.0 and bm.jaccard(empty, gt) == 0.0
    assert bm.hd95(empty, gt) == pytest.approx(worst) and bm.asd(empty, gt) == pytest.approx(worst)
    assert bm.hd95(gt, empty) == pytest.approx(worst)  # prediction where nothing is
    assert bm.hd95(empty, empty) == 0.0


def test_both_empty_is_a_correct_answer_and_matches_medpy_where_defined():
    medpy = pytest.importorskip("medpy.metric.binary")
    empty = np.zeros((6, 6, 6), bool)
    assert bm.jaccard(empty, empty) == medpy.jc(empty, empty) == 1.0
    with np.errstate(invalid="ignore"):
        assert np.isnan(medpy.dc(empty, empty))  # medpy leaves it undefined; we say 1.0
    assert bm.dice(empty, empty) == 1.0 and bm.asd(empty, empty) == 0.0


def _random_pair(seed, shape=(30, 26, 20)):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    a = ndimage.binary_dilation(rng.random(shape) > 0.995, iterations=3)
    b = ndimage.binary_dilation(a, iterations=1) ^ (rng.random(shape) > 0.97)
    return a, b


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spacing", [None, (1.25, 1.25, 2.5)])
def test_against_medpy(seed, spacing):
    medpy = pytest.importorskip("medpy.metric.binary")
    a, b = _random_pair(seed)
    assert bm.dice(a, b) == pytest.approx(medpy.dc(a, b), rel=1e-12)
    assert bm.jaccard(a, b) == pytest.approx(medpy.jc(a, b), rel=1e-12)
    assert bm.hd95(a, b, spacing) == pytest.approx(medpy.hd95(a, b, spacing), rel=1e-12)
    assert bm.asd(a, b, spacing) == pytest.approx(medpy.asd(a, b, spacing), rel=1e-12)
    assert bm.asd(b, a, spacing) == pytest.approx(medpy.asd(b, a, spacing), rel=1e-12)


def test_against_medpy_touching_the_border():
    """Cropping to the bounding box must not change anything when organs touch the volume edge."""
    medpy = pytest.importorskip("medpy.metric.binary")
    a = _cube((20, 20, 12), (0, 3, 0), (9, 12, 12))
    b = _cube((20, 20, 12), (2, 0, 1), (12, 10, 12))
    b[15:20, 15:20, 5:12] = True  # a second piece in the far corner
    for x, y in [(a, b), (b, a)]:
        assert bm.hd95(x, y) == pytest.approx(medpy.hd95(x, y), rel=1e-12)
        assert bm.asd(x, y, (0.5, 1, 2)) == pytest.approx(medpy.asd(x, y, (0.5, 1, 2)), rel=1e-12)
        assert bm.surface_metrics(x, y) == pytest.approx((medpy.hd95(x, y), medpy.asd(x, y)), rel=1e-12)
