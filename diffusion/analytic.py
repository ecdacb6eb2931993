"""Gaussian-mixture data with an exact denoiser: the ground truth every sampler is tested against.

Data x_0 ~ sum_k w_k N(mu_k, diag(v_k)) in any event shape (vectors or small images, flattened to D
internally). Under x_t = alpha x_0 + sigma eps each component stays Gaussian,

    x_t | k ~ N(alpha mu_k, diag(alpha^2 v_k + sigma^2)),
    E[x_0 | x_t, k] = mu_k + alpha v_k / (alpha^2 v_k + sigma^2) * (x_t - alpha mu_k),

so E[x_0 | x_t] (the ideal denoiser, i.e. the exact score) is a responsibility-weighted sum. For one
Gaussian the probability-flow ODE has a closed-form solution map (each coordinate keeps its
standardised value), used as the exact reference for ODE samplers. Everything follows the active
float precision: run under `jax.enable_x64(True)` for float64.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.schedules import Schedule


@dataclasses.dataclass(frozen=True, eq=False)
class GMM:
    """Diagonal Gaussian mixture: weights (K,), means (K, D), variances (K, D)."""

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    event_shape: tuple[int, ...]

    def __post_init__(self):
        k, d = np.shape(self.means)
        if np.shape(self.weights) != (k,):
            raise ValueError(f"weights shape {np.shape(self.weights)} != ({k},) from means")
        if np.shape(self.variances) != (k, d):
            raise ValueError(f"variances shape {np.shape(self.variances)} != means {(k, d)}")
        if math.prod(self.event_shape) != d:
            raise ValueError(f"event_shape {self.event_shape} does not hold D={d} values")
        if np.any(np.asarray(self.variances) <= 0) or not np.isclose(np.sum(self.weights), 1):
            raise ValueError("variances must be > 0 and weights must sum to 1")

    @property
    def dim(self) -> int:
        return int(np.shape(self.means)[1])

    def _params(self, dtype):
        return (
            jnp.asarray(self.weights, dtype),
            jnp.asarray(self.means, dtype),
            jnp.asarray(self.variances, dtype),
        )

    def _flat(self, x):
        return x.reshape(x.shape[0], self.dim)  # (B, D)

    def _component_terms(self, x_t, t, schedule: Schedule):
        """Log joint log w_k + log N(x_t | k) (B, K) and per-component posterior means (B, K, D)."""
        x = self._flat(x_t)
        w, mu, v = self._params(x.dtype)
        alpha = jnp.asarray(schedule.alpha(t), x.dtype)
        sigma = jnp.asarray(schedule.sigma(t), x.dtype)
        var_t = alpha**2 * v + sigma**2  # (K, D)
        diff = x[:, None, :] - alpha * mu[None]  # (B, K, D)
        log_n = -0.5 * jnp.sum(diff**2 / var_t + jnp.log(2 * jnp.pi * var_t), axis=-1)  # (B, K)
        post_mean = mu[None] + (alpha * v / var_t)[None] * diff  # (B, K, D)
        return jnp.log(w)[None] + log_n, post_mean

    def denoise(self, x_t, t, schedule: Schedule):
        """Exact E[x_0 | x_t] at time t; x_t (B, *event_shape)."""
        log_joint, post_mean = self._component_terms(x_t, t, schedule)
        resp = jax.nn.softmax(log_joint, axis=-1)  # (B, K)
        return jnp.einsum("bk,bkd->bd", resp, post_mean).reshape(x_t.shape)

    def score(self, x_t, t, schedule: Schedule):
        """grad_x log p_t(x_t) = (alpha E[x_0 | x_t] - x_t) / sigma^2."""
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        return (alpha * self.denoise(x_t, t, schedule) - x_t) / sigma**2

    def log_prob_t(self, x_t, t, schedule: Schedule):
        """log p_t(x_t), (B,)."""
        log_joint, _ = self._component_terms(x_t, t, schedule)
        return jax.scipy.special.logsumexp(log_joint, axis=-1)

    def log_prob(self, x):
        """Exact data log-density log p_0(x), (B,)."""
        x = self._flat(x)
        w, mu, v = self._params(x.dtype)
        log_n = -0.5 * jnp.sum(
            (x[:, None, :] - mu[None]) ** 2 / v + jnp.log(2 * jnp.pi * v), axis=-1
        )  # (B, K)
        return jax.scipy.special.logsumexp(jnp.log(w)[None] + log_n, axis=-1)

    def sample(self, rng, n: int, dtype=None):
        """n exact samples, (n, *event_shape)."""
        dtype = dtype or jnp.result_type(float)
        w, mu, v = self._params(dtype)
        k_rng, z_rng = jax.random.split(rng)
        k = jax.random.choice(k_rng, w.shape[0], (n,), p=w)
        z = jax.random.normal(z_rng, (n, self.dim), dtype)
        return (mu[k] + jnp.sqrt(v[k]) * z).reshape((n, *self.event_shape))

    def ode_map(self, x_s, s, t, schedule: Schedule):
        """Exact probability-flow ODE solution from time s to time t (single Gaussian only)."""
        if np.shape(self.means)[0] != 1:
            raise ValueError("ode_map has a closed form only for a single Gaussian (K == 1)")
        x = self._flat(x_s)
        _, mu, v = self._params(x.dtype)
        a_s, s_s = schedule.alpha(s), schedule.sigma(s)
        a_t, s_t = schedule.alpha(t), schedule.sigma(t)
        ratio = jnp.sqrt((a_t**2 * v + s_t**2) / (a_s**2 * v + s_s**2))  # (1, D)
        return (a_t * mu + ratio * (x - a_s * mu)).reshape(x_s.shape)


def _ring(k: int, radius: float, std: float, dim_scale=(1.0, 1.0)):
    ang = 2 * np.pi * np.arange(k) / k
    means = radius * np.stack([np.cos(ang), np.sin(ang)], axis=1) * np.asarray(dim_scale)
    return np.full(k, 1.0 / k), means, np.full((k, 2), std**2)


def _image_gmm(size=8):
    """Four 8x8 patterns (horizontal bar, vertical bar, diagonal, ring), pixel values in [-1, 1]."""
    yy, xx = np.mgrid[:size, :size] / (size - 1)
    pats = [
        np.abs(yy - 0.5) < 0.2,
        np.abs(xx - 0.5) < 0.2,
        np.abs(xx - yy) < 0.2,
        np.abs(np.hypot(xx - 0.5, yy - 0.5) - 0.35) < 0.12,
    ]
    means = np.stack([np.where(p, 0.8, -0.8).ravel() for p in pats])  # (4, 64)
    return np.full(4, 0.25), means, np.full(means.shape, 0.05), (size, size, 1)


PRESETS = {
    "gaussian2d": lambda: (np.ones(1), np.array([[0.5, -0.3]]), np.array([[1.5, 0.2]]), (2,)),
    "gmm2d": lambda: (*_ring(8, 2.0, 0.5), (2,)),
    "gmm2d_separated": lambda: (*_ring(8, 3.0, 0.15), (2,)),
    "gmm_image": _image_gmm,
}


def make_gmm(name: str) -> GMM:
    """A built-in mixture: gaussian2d, gmm2d (8 overlapping modes), gmm2d_separated, gmm_image."""
    if name not in PRESETS:
        raise ValueError(f"unknown GMM preset {name!r}; valid: {sorted(PRESETS)}")
    w, mu, v, shape = PRESETS[name]()
    return GMM(np.asarray(w, float), np.asarray(mu, float), np.asarray(v, float), tuple(shape))


def reference_ode_solution(gmm: GMM, x_s, s, t, schedule: Schedule, *, rtol=1e-10, atol=1e-10):
    """Probability-flow ODE solution from time s to t > 0 with the exact denoiser, by scipy's
    adaptive DOP853 (independent of this package's samplers); for one Gaussian `ode_map` is the
    closed form. VP/VE: dx~/du = x~ - x0_hat in x~ = x / alpha, u = log(sigma / alpha); flow
    (alpha = 0 at t_max): dx/dsigma = (x - x0_hat) / sigma. Both are smooth. Host float64."""
    import scipy.integrate

    if float(t) <= 0:
        raise ValueError("reference_ode_solution needs t > 0 (sigma = 0 is singular)")
    shape, flow = x_s.shape, schedule.family == "flow"
    with jax.enable_x64(True):
        # Integration variable: sigma (flow) or u = -lambda (VP/VE); state: x (flow) or x / alpha.
        to_var = (lambda tt: schedule.sigma(tt)) if flow else (lambda tt: -schedule.logsnr(tt))
        scale = (lambda tt: 1.0) if flow else schedule.alpha

        def time_of(v):
            return schedule.t_from_sigma(v) if flow else schedule.t_from_logsnr(-v)

        @jax.jit
        def rhs(v, y):
            tt = time_of(v)
            x = y.reshape(shape) * scale(tt)
            d = y - gmm.denoise(x, tt, schedule).ravel()
            return d / v if flow else d

        v0, v1 = (float(to_var(jnp.float64(tt))) for tt in (s, t))
        y0 = np.asarray(x_s, np.float64).ravel() / float(scale(jnp.float64(s)))
        sol = scipy.integrate.solve_ivp(
            lambda v, y: np.asarray(rhs(jnp.float64(v), jnp.asarray(y))),
            (v0, v1),
            y0,
            method="DOP853",
            rtol=rtol,
            atol=atol,
        )
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        return sol.y[:, -1].reshape(shape) * float(scale(jnp.float64(t)))
