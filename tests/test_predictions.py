"""Prediction-type conversions (eps / x0 / v / velocity / score) on every schedule family, and the
model -> denoiser wrapper against the exact posterior mean of Gaussian data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import predictions, schedules

KINDS = predictions.PREDICTION_TYPES
SCHEDULES = {
    "scaled_linear": schedules.get("scaled_linear"),  # discrete VP
    "vp_cosine": schedules.get("vp_cosine"),
    "rectified_flow": schedules.get("rectified_flow", shift=3.0),
    "edm": schedules.get("edm"),
}


def _state(schedule, seed=0):
    """(x0, eps, t, x_t) at an interior time, float64."""
    k0, k1 = jax.random.split(jax.random.key(seed))
    x0 = jax.random.normal(k0, (3, 4), jnp.float64)
    eps = jax.random.normal(k1, (3, 4), jnp.float64)
    t = jnp.asarray(0.37 * schedule.t_max + 0.63 * schedule.t_min, jnp.float64)
    return x0, eps, t, schedule.alpha(t) * x0 + schedule.sigma(t) * eps


def _independent_targets(x0, eps, a, s):
    """The definitions, written out here (not from predictions.py)."""
    return {"x0": x0, "eps": eps, "v": a * eps - s * x0, "velocity": eps - x0, "score": -eps / s}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_round_trips_and_targets(name):
    s = SCHEDULES[name]
    with jax.enable_x64(True):
        x0, eps, t, x_t = _state(s)
        ref = _independent_targets(x0, eps, s.alpha(t), s.sigma(t))
        for kind in KINDS:
            target = predictions.targets(x0, eps, t, s, kind)
            np.testing.assert_allclose(target, ref[kind], rtol=1e-12, err_msg=kind)
            # targets are consistent with from_x0 (x_t built from the same x0, eps) ...
            np.testing.assert_allclose(
                predictions.from_x0(x0, x_t, t, s, kind), target, rtol=1e-9, atol=1e-9
            )
            # ... and to_x0 inverts them.
            np.testing.assert_allclose(
                predictions.to_x0(target, x_t, t, s, kind), x0, rtol=1e-9, atol=1e-9
            )
            for other in KINDS:
                got = predictions.convert(target, x_t, t, s, kind, other)
                np.testing.assert_allclose(got, ref[other], rtol=1e-8, atol=1e-9)


def test_v_on_non_vp_schedules_uses_general_inverse():
    """v = alpha eps - sigma x0 is invertible for any alpha, sigma (alpha^2 + sigma^2 != 1)."""
    s = SCHEDULES["rectified_flow"]
    with jax.enable_x64(True):
        x0, eps, t, x_t = _state(s, seed=3)
        assert abs(float(s.alpha(t) ** 2 + s.sigma(t) ** 2) - 1.0) > 0.1
        v = s.alpha(t) * eps - s.sigma(t) * x0
        np.testing.assert_allclose(predictions.to_x0(v, x_t, t, s, "v"), x0, rtol=1e-9)


@pytest.mark.parametrize("name", ["scaled_linear", "vp_cosine", "rectified_flow", "edm"])
@pytest.mark.parametrize("kind", KINDS)
def test_as_denoiser_gaussian_posterior_mean(name, kind):
    """Data N(mu, v): the exact network of each type, wrapped by as_denoiser, gives
    E[x0 | x_t] = mu + alpha v / (alpha^2 v + sigma^2) (x_t - alpha mu); the network receives
    schedule.model_time(t)."""
    s = SCHEDULES[name]
    mu, var = jnp.array([0.3, -1.2]), jnp.array([0.5, 2.0])
    with jax.enable_x64(True):
        t = jnp.asarray(0.4 * s.t_max, jnp.float64)
        a, sig = s.alpha(t), s.sigma(t)
        x_t = jax.random.normal(jax.random.key(1), (5, 2), jnp.float64) * 2.0
        post_x0 = mu + a * var / (a * a * var + sig * sig) * (x_t - a * mu)
        post_eps = sig * (x_t - a * mu) / (a * a * var + sig * sig)
        seen = []

        def model_fn(x, model_time):
            seen.append(float(model_time))
            return _independent_targets(post_x0, post_eps, a, sig)[kind]

        den = predictions.as_denoiser(model_fn, s, kind)
        np.testing.assert_allclose(den(x_t, t), post_x0, rtol=1e-9, atol=1e-10)
        assert seen == [pytest.approx(float(s.model_time(t)))]


def test_diffusers_spellings_and_unknown_type():
    for diffusers_name, ours in [
        ("epsilon", "eps"),
        ("sample", "x0"),
        ("v_prediction", "v"),
        ("flow_prediction", "velocity"),
    ]:
        assert predictions.canonical(diffusers_name) == ours
    for kind in KINDS:
        assert predictions.canonical(kind) == kind
    with pytest.raises(ValueError, match="unknown prediction_type 'noise'.*v_prediction"):
        predictions.canonical("noise")
    s = SCHEDULES["scaled_linear"]
    with pytest.raises(ValueError, match="unknown prediction_type"):
        predictions.as_denoiser(lambda x, t: x, s, "noise")
    x = jnp.ones((2, 2))
    with pytest.raises(ValueError, match="unknown prediction_type"):
        predictions.to_x0(x, x, 0.5, s, "nope")


def test_diffusers_spelling_gives_same_denoiser():
    s = SCHEDULES["scaled_linear"]
    model_fn = lambda x, mt: 0.1 * x + 0.01 * mt
    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    for a, b in [("epsilon", "eps"), ("v_prediction", "v"), ("sample", "x0")]:
        np.testing.assert_allclose(
            predictions.as_denoiser(model_fn, s, a)(x, 0.3),
            predictions.as_denoiser(model_fn, s, b)(x, 0.3),
        )
