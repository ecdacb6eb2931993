"""Set distances against float64 NumPy/SciPy references written here (independent formulas:
scipy.linalg.sqrtm for FD as pytorch-fid computes it, full kernel matrices for KID, cdist +
sort for the k-NN radii of precision/recall), and bad input."""

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist

from diffusion import metrics


def _ref_fd(x, y):
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)


def _ref_mmd2(x, y, degree=3):
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** degree for a, b in ((x, x), (y, y), (x, y)))
    m, n = len(x), len(y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())  # fmt: skip


def _ref_precision_recall(real, fake, k):
    def radii(a):
        return np.sort(cdist(a, a), axis=1)[:, k]  # column 0 is the point itself

    def coverage(q, ref, r):
        return np.mean(np.any(cdist(q, ref) <= r[None, :], axis=1))

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


@pytest.fixture(scope="module")
def sets():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 24)) @ rng.standard_normal((24, 24)) * 0.3 + 1.0
    y = rng.standard_normal((260, 24)) * 1.1 + 0.8
    return x.astype(np.float32), y.astype(np.float32)


def test_frechet_distance(sets):
    x, y = sets
    ref = _ref_fd(x.astype(np.float64), y.astype(np.float64))
    np.testing.assert_allclose(metrics.frechet_distance(x, y), ref, rtol=1e-6)
    mu, sigma = metrics.feature_stats(x)
    np.testing.assert_allclose(
        sigma, np.cov(x.astype(np.float64), rowvar=False, ddof=1), rtol=1e-12
    )
    # FD of a set with itself is 0, also rank-deficient (N < D: sqrtm's hard case).
    assert abs(metrics.frechet_distance(x, x)) < 1e-9 * np.trace(sigma)
    small = x[:10]
    assert abs(metrics.frechet_distance(small, small)) < 1e-9 * np.trace(np.cov(small.T))


def test_kid_full_and_subsets(sets):
    x, y = (a.astype(np.float64) for a in sets)
    # block_size smaller than N and not a divisor: exercises padding and masking
    np.testing.assert_allclose(metrics.kid(x, y, block_size=64), _ref_mmd2(x, y), rtol=1e-6)
    np.testing.assert_allclose(metrics.kid(x, x[::-1]), _ref_mmd2(x, x[::-1]), rtol=1e-6)
    est = metrics.kid_subsets(x, y, subset_size=50, num_subsets=4, seed=3, block_size=16)
    ix, iy = metrics.subset_indices(len(x), len(y), 50, 4, seed=3)
    ref = [_ref_mmd2(x[i], y[j]) for i, j in zip(ix, iy)]
    np.testing.assert_allclose(est, ref, rtol=1e-6)
    assert len(set(ix[0])) == 50  # without replacement


def test_precision_recall(sets):
    x, y = (a.astype(np.float64) for a in sets)
    for k in (1, 3):
        out = metrics.precision_recall(x, y, k=k, block_size=128)
        p, r = _ref_precision_recall(x, y, k)
        np.testing.assert_allclose([out["precision"], out["recall"]], [p, r], rtol=1e-6)
        assert 0.05 < p < 0.95 and 0.05 < r < 0.95  # a comparison that can fail
    assert metrics.precision_recall(x, x) == {"precision": 1.0, "recall": 1.0}


def test_bad_input(sets):
    x, y = sets
    with pytest.raises(ValueError, match="feature dimensions differ: x has 24, y has 10"):
        metrics.frechet_distance(x, y[:, :10])
    with pytest.raises(ValueError, match="real has 24, fake has 10"):
        metrics.precision_recall(x, y[:, :10])
    for fn in (metrics.frechet_distance, metrics.kid):
        with pytest.raises(ValueError, match="at least 2 samples"):
            fn(x[:0], y)
    with pytest.raises(ValueError, match="at least 4 samples"):
        metrics.precision_recall(x, y[:3], k=3)
    with pytest.raises(ValueError, match="non-finite"):
        metrics.kid(np.full_like(x, np.nan), y)
    with pytest.raises(ValueError, match="subset_size"):
        metrics.kid_subsets(x, y, subset_size=1000)
    with pytest.raises(ValueError, match="statistics do not match"):
        metrics.frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
