"""Sample-quality metrics: sliced Wasserstein, Frechet distance, KID, exact-GMM metrics.

All take sample arrays (N, ...) and flatten trailing dimensions. Feature extractors (for FID-style
use on images) are the caller's business: these functions only compare feature sets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg


def _flat(x):
    x = jnp.asarray(x)
    return x.reshape(x.shape[0], -1)


def sliced_wasserstein(x, y, rng, num_projections: int = 256):
    """Sliced 2-Wasserstein distance (Rabin et al. 2011) between two equal-size sample sets.

    Mean over random unit directions of the 1-D W2^2 between sorted projections, then sqrt.
    """
    x, y = _flat(x), _flat(y)
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs equal shapes, got x {x.shape}, y {y.shape}")
    dirs = jax.random.normal(rng, (x.shape[1], num_projections), x.dtype)
    dirs = dirs / jnp.linalg.norm(dirs, axis=0, keepdims=True)  # (D, P)
    px, py = jnp.sort(x @ dirs, axis=0), jnp.sort(y @ dirs, axis=0)  # (N, P)
    return jnp.sqrt(jnp.mean((px - py) ** 2))


def frechet_distance(x, y):
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017)."""
    x, y = np.asarray(_flat(x), np.float64), np.asarray(_flat(y), np.float64)
    mu1, mu2 = x.mean(0), y.mean(0)
    c1, c2 = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    covmean = scipy.linalg.sqrtm(c1 @ c2)
    covmean = np.real(covmean)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * covmean))


def kid(x, y, degree: int = 3):
    """Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2, polynomial kernel."""
    x, y = np.asarray(_flat(x), np.float64), np.asarray(_flat(y), np.float64)
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1.0) ** degree
    m, n = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


def gmm_metrics(gmm, samples, rng, num_reference: int | None = None):
    """Exact-GMM metrics of samples: mean log-likelihood under the true density, and sliced W2
    against the same number of exact samples (and the exact-vs-exact baseline for scale)."""
    n = samples.shape[0]
    r1, r2, r3 = jax.random.split(rng, 3)
    ref = gmm.sample(r1, num_reference or n, samples.dtype)
    ref2 = gmm.sample(r2, num_reference or n, samples.dtype)
    return {
        "loglik": float(jnp.mean(gmm.log_prob(samples))),
        "loglik_exact": float(jnp.mean(gmm.log_prob(ref))),
        "swd": float(sliced_wasserstein(samples, ref, r3)),
        "swd_exact": float(sliced_wasserstein(ref2, ref, r3)),
    }
