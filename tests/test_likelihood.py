"""Probability-flow ODE log-likelihood against exact densities.

Reference: for a Gaussian mixture the noised marginal p_t is again a mixture with known
parameters (analytic.GMM.log_prob_t), so log p_{t_min}(x) is exact. The ODE method replaces the
terminal density p_{t_max} by N(0, sigma(t_max)^2 I); that modelling error is not the solver's, so
the expected value adds the exact correction log N(x_T) - log p_{t_max}(x_T) at the ODE endpoint
x_T, computed independently by scipy's DOP853 (analytic.reference_ode_solution; at rtol 1e-7,
ample because the correction's gradient in x_T is O(alpha(t_max)) ~ 1e-2; the correction is zero
for rectified flow, whose alpha(t_max) = 0). Everything runs in float32 with the default
tolerances: the claim is that the defaults meet 1e-3 nats without tuning.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import analytic, likelihood, schedules
from diffusion.data import random_gmm


def _gmm(name):
    return analytic.make_gmm(name) if name == "gmm2d" else random_gmm(16, 8, seed=1)


def _expected(gmm, x, schedule, t_min):
    """Exact log p_{t_min}(x) plus the terminal-Gaussian correction at the exact ODE endpoint."""
    with jax.enable_x64(True):
        x64 = np.asarray(x, np.float64)
        x_T = analytic.reference_ode_solution(
            gmm, x64, t_min, schedule.t_max, schedule, rtol=1e-7, atol=1e-7
        )
        s_T = float(schedule.sigma(schedule.t_max))
        prior = -0.5 * np.sum(x_T**2, 1) / s_T**2 - gmm.dim * math.log(s_T * math.sqrt(2 * np.pi))
        corr = prior - np.asarray(gmm.log_prob_t(jnp.asarray(x_T), schedule.t_max, schedule))
        return np.asarray(gmm.log_prob_t(jnp.asarray(x64), t_min, schedule)) + corr


@pytest.mark.parametrize(
    "gmm_name, sched, t_min",
    [
        ("gmm2d", "vp_linear", 1e-5),  # score_sde's VP setting
        ("gmm2d", "edm", None),
        ("d16", "vp_linear", None),
        ("d16", "rectified_flow", None),
        ("d16", "linear", None),  # DDPM table: smooth in lambda despite its kinks in t
    ],
)
def test_exact_trace_matches_gmm_density(gmm_name, sched, t_min):
    gmm, schedule = _gmm(gmm_name), schedules.get(sched)
    x = gmm.sample(jax.random.key(0), 32, jnp.float32)
    ll = likelihood.log_likelihood(
        lambda z, t: gmm.denoise(z, t, schedule), x, schedule, t_min=t_min
    )
    expected = _expected(gmm, x, schedule, t_min or schedule.t_min)
    err = np.abs(np.asarray(ll, np.float64) - expected)
    assert ll.shape == (32,) and err.max() < 1e-3, f"max error {err.max():.2e} nats"


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(probe):
    """32 independent probes per example: each example's mean is within 3.5 standard errors of
    the exact value (8 examples, so a 3-sigma rule would fail by chance now and then)."""
    gmm, schedule = _gmm("d16"), schedules.get("vp_linear")
    x = gmm.sample(jax.random.key(1), 8, jnp.float32)
    reps = 32
    xr = jnp.repeat(x, reps, axis=0)  # (8 * 32, 16), each probe an independent row
    den = lambda z, t: gmm.denoise(z, t, schedule)
    ll = likelihood.log_likelihood(den, xr, schedule, trace="hutchinson", rng=jax.random.key(2),
                                   probe=probe)  # fmt: skip
    est = np.asarray(ll, np.float64).reshape(8, reps)
    mean, se = est.mean(1), est.std(1, ddof=1) / math.sqrt(reps)
    z = (mean - _expected(gmm, x, schedule, schedule.t_min)) / se
    assert np.all(se > 1e-3), "the estimator should be noisy at D = 16"
    assert np.all(np.abs(z) < 3.5), f"z-scores {np.round(z, 2)}"


def test_batched_time_and_fixed_steps():
    """A denoiser that insists on (N,) t gives the same answer; fixed steps converge too."""
    gmm, schedule = _gmm("gmm2d"), schedules.get("vp_cosine")
    x = gmm.sample(jax.random.key(3), 16, jnp.float32)

    def per_example(z, t):
        assert t.shape == (z.shape[0],)
        return jax.vmap(lambda zi, ti: gmm.denoise(zi[None], ti, schedule)[0])(z, t)

    scalar = lambda z, t: gmm.denoise(z, t, schedule)
    ll = likelihood.log_likelihood(scalar, x, schedule)
    ll_b = likelihood.log_likelihood(per_example, x, schedule, batch_time=True)
    np.testing.assert_allclose(ll_b, ll, rtol=0, atol=1e-4)
    ll_fixed, nfe = likelihood.log_likelihood(scalar, x, schedule, num_steps=40, return_nfe=True)
    assert int(nfe) == 1 + 6 * 40
    err = np.abs(np.asarray(ll_fixed, np.float64) - _expected(gmm, x, schedule, schedule.t_min))
    assert err.max() < 1e-3


def _uniform_denoiser(schedule):
    """E[x_0 | x_t] for x_0 ~ U[-1, 1]^D: the mean of N(x_t / alpha, (sigma / alpha)^2)
    truncated to [-1, 1], per coordinate."""
    from jax.scipy.special import ndtr
    from jax.scipy.stats import norm

    def denoise(x, t):
        m, s = x / schedule.alpha(t), schedule.sigma(t) / schedule.alpha(t)
        a, b = (-1 - m) / s, (1 - m) / s
        return m + s * (norm.pdf(a) - norm.pdf(b)) / (ndtr(b) - ndtr(a))

    return denoise


def _uniform_log_prob_t(x, t, schedule):
    """log p_t(x) for x_0 ~ U[-1, 1]^D: prod over coordinates of
    (Phi((x + alpha) / sigma) - Phi((x - alpha) / sigma)) / (2 alpha)."""
    from jax.scipy.special import ndtr

    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    p = (ndtr((x + alpha) / sigma) - ndtr((x - alpha) / sigma)) / (2 * alpha)
    return jnp.sum(jnp.log(p).reshape(x.shape[0], -1), axis=1)


def test_bits_per_dim_of_uniform_data():
    """Theory: uint8 data uniform on 0..255, dequantised, under the model whose density is
    uniform on [-1, 1]^D has exactly 8 bits/dim. Exact form: bits_per_dim(-D log 2) = 8. End to
    end: the ODE likelihood with the exact denoiser of U[-1, 1]^D gives the bits/dim of the exact
    noised marginal at t_min (within 1e-4), which is 8 up to the mass the noise moves across the
    cube's faces."""
    d = 4
    for low, high in [(-1.0, 1.0), (0.0, 1.0)]:
        ll_uniform = -d * math.log(high - low)
        assert float(likelihood.bits_per_dim(ll_uniform, d, low=low, high=high)) == 8.0
    with jax.enable_x64(True):
        schedule = schedules.get("vp_linear")
        x8 = jax.random.randint(jax.random.key(4), (64, 2, 2, 1), 0, 256).astype(jnp.uint8)
        z = likelihood.dequantize(x8, jax.random.key(5)).astype(jnp.float64)
        assert float(z.min()) >= -1.0 and float(z.max()) <= 1.0
        ll = likelihood.log_likelihood(_uniform_denoiser(schedule), z, schedule, t_min=1e-5)
        exact = _uniform_log_prob_t(z, 1e-5, schedule)
        bpd, bpd_exact = (likelihood.bits_per_dim(v, d) for v in (ll, exact))
        assert float(jnp.max(jnp.abs(bpd - bpd_exact))) < 1e-4
        assert abs(float(jnp.mean(bpd)) - 8.0) < 0.02, float(jnp.mean(bpd))


def test_bad_input():
    gmm, schedule = _gmm("gmm2d"), schedules.get("vp_linear")
    den = lambda z, t: gmm.denoise(z, t, schedule)
    x = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="valid: \\['exact', 'hutchinson'\\]"):
        likelihood.log_likelihood(den, x, schedule, trace="skilling")
    with pytest.raises(ValueError, match="pass rng"):
        likelihood.log_likelihood(den, x, schedule, trace="hutchinson")
    with pytest.raises(ValueError, match="t_min"):
        likelihood.log_likelihood(den, x, schedule, t_min=0.0)
    with pytest.raises(ValueError, match="N >= 1"):
        likelihood.log_likelihood(den, jnp.zeros((0, 2)), schedule)
    with pytest.raises(ValueError, match="uint8"):
        likelihood.dequantize(x, jax.random.key(0))
