"""The analytic testbed against independent facts: Tweedie's formula via autodiff of the exact
marginal density, the probability-flow ODE itself, and sample moments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import analytic, schedules


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("preset", ["gaussian2d", "gmm2d", "gmm_image"])
@pytest.mark.parametrize("sched", ["vp_linear", "rectified_flow", "edm", "scaled_linear"])
def test_denoiser_is_tweedie(preset, sched):
    """E[x0|x_t] = (x_t + sigma^2 grad log p_t(x_t)) / alpha, with grad from autodiff of log p_t."""
    g, s = analytic.make_gmm(preset), schedules.get(sched)
    t = 0.4 * s.t_max
    x = g.sample(jax.random.key(0), 6) * s.alpha(t) + s.sigma(t) * jax.random.normal(
        jax.random.key(1), (6, *g.event_shape)
    )
    grad = jax.vmap(jax.grad(lambda xx: g.log_prob_t(xx[None], t, s)[0]))(x)
    tweedie = (x + s.sigma(t) ** 2 * grad) / s.alpha(t)
    np.testing.assert_allclose(g.denoise(x, t, s), tweedie, rtol=1e-10, atol=1e-10)


def test_log_prob_normalised_and_matches_t0():
    g = analytic.make_gmm("gmm2d")
    xs = np.linspace(-6, 6, 301)
    grid = jnp.asarray(np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2))
    mass = float(jnp.sum(jnp.exp(g.log_prob(grid)))) * (xs[1] - xs[0]) ** 2
    assert abs(mass - 1.0) < 1e-6
    s = schedules.get("vp_linear")
    np.testing.assert_allclose(g.log_prob_t(grid[:50], 0.0, s), g.log_prob(grid[:50]), rtol=1e-12)


@pytest.mark.parametrize("sched", ["vp_cosine", "rectified_flow", "edm"])
def test_ode_map_solves_probability_flow_ode(sched):
    """d/dt ode_map(x_s, s, t) equals the PF-ODE velocity alpha' x0_hat + sigma' eps_hat."""
    g, s = (
        analytic.make_gmm("gaussian2d"),
        schedules.get(sched, **({"shift": 3.0} if sched == "rectified_flow" else {})),
    )
    x_s = g.sample(jax.random.key(2), 4)
    t = 0.37 * s.t_max
    x_t = g.ode_map(x_s, 0.0, t, s)
    dx = jax.jacfwd(lambda tt: g.ode_map(x_s, 0.0, tt, s))(t)
    da = jax.grad(lambda tt: s.alpha(tt))(t)
    ds = jax.grad(lambda tt: s.sigma(tt))(t)
    x0 = g.denoise(x_t, t, s)
    eps = (x_t - s.alpha(t) * x0) / s.sigma(t)
    np.testing.assert_allclose(dx, da * x0 + ds * eps, rtol=1e-8, atol=1e-10)
    # the map is a flow: s -> u -> t equals s -> t
    u = 0.8 * s.t_max
    np.testing.assert_allclose(
        g.ode_map(g.ode_map(x_t, t, u, s), u, 0.1 * s.t_max, s), g.ode_map(x_t, t, 0.1 * s.t_max, s)
    )


def test_samples_have_mixture_moments():
    g = analytic.make_gmm("gmm2d")
    x = g.sample(jax.random.key(3), 200_000)
    mean = np.sum(g.weights[:, None] * g.means, 0)
    second = np.sum(g.weights[:, None] * (g.variances + g.means**2), 0)
    np.testing.assert_allclose(np.mean(x, 0), mean, atol=0.02)
    np.testing.assert_allclose(np.mean(x**2, 0), second, rtol=0.01)


def test_bad_input():
    with pytest.raises(ValueError, match="valid"):
        analytic.make_gmm("nope")
    with pytest.raises(ValueError, match="single Gaussian"):
        g = analytic.make_gmm("gmm2d")
        g.ode_map(jnp.zeros((1, 2)), 0.0, 0.5, schedules.get("vp_linear"))
    with pytest.raises(ValueError, match="variances shape"):
        analytic.GMM(np.ones(1), np.zeros((1, 2)), np.ones((1, 3)), (2,))


@pytest.mark.parametrize(
    "sched,kw", [("vp_linear", {}), ("rectified_flow", {"shift": 3.0}), ("edm", {})]
)
def test_reference_ode_solution_matches_closed_form(sched, kw):
    """scipy's adaptive solve of the PF-ODE (the benchmark's GMM reference) agrees with the
    closed-form Gaussian map, so it can stand in as truth where no closed form exists."""
    g, s = analytic.make_gmm("gaussian2d"), schedules.get(sched, **kw)
    x = np.asarray(jax.random.normal(jax.random.key(4), (64, 2))) * float(s.sigma(s.t_max))
    exact = g.ode_map(jnp.asarray(x), s.t_max, s.t_min, s)
    ref = analytic.reference_ode_solution(g, x, s.t_max, s.t_min, s)
    np.testing.assert_allclose(ref, exact, rtol=1e-7, atol=1e-8)
