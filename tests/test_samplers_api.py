"""Cross-cutting checks over EVERY entry of samplers.SAMPLERS (the registry is iterated, so methods
added later are covered): exact nfe, one compiled program independent of num_steps, input errors,
and the time grids (against diffusers' DDIMScheduler spacings)."""

import collections
import inspect

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler

from diffusion import samplers, schedules
from diffusion.samplers import GRIDS, SAMPLERS

SCHEDULE = schedules.get("linear")
X = jnp.full((2, 3), 0.3)  # tiny x_T
METHODS = sorted(SAMPLERS)
# Compiler options for the nfe programs: they are run once, so skip expensive XLA passes.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _default_order(name):
    p = inspect.signature(SAMPLERS[name].run).parameters.get("order")
    return None if p is None else p.default


def _configs(name):
    """One options dict per supported order ({} for methods without an `order` option)."""
    return [{"order": o} for o in SAMPLERS[name].orders] or [{}]


def _opts_id(opts):
    return ",".join(f"{k}={v}" for k, v in opts.items()) or "default"


CONFIGS = [(name, opts) for name in METHODS for opts in _configs(name)]
CONFIG_IDS = [f"{name}[{_opts_id(opts)}]" for name, opts in CONFIGS]


def _marked_denoiser(x, t):
    """Identity-like denoiser; lax.cbrt marks each call site in the jaxpr (nothing else uses it)."""
    return x * (0.5 + 0.01 * jax.lax.cbrt(jnp.asarray(t, x.dtype)))


# ------------------------------------------------------------------------------- (a) nfe


@pytest.mark.parametrize("name", METHODS)
def test_nfe_matches_counted_calls(name):
    """samplers.nfe equals the number of denoiser calls, counted at run time with a host callback
    (calls inside untaken lax.cond branches are not counted). Every order at num_steps=5, and the
    default options at num_steps=1; all runs in one program per method to compile once."""
    runs = [(opts, 5) for opts in _configs(name)] + [({}, 1)]
    counts = collections.Counter()

    def program(x, rng):
        outs = []
        for k, (opts, n) in enumerate(runs):

            def denoise(x, t, k=k):
                jax.debug.callback(lambda: counts.update([k]))
                return _marked_denoiser(x, t)

            outs.append(
                samplers.sample(
                    denoise, x, SCHEDULE, method=name, num_steps=n, rng=rng, return_info=True,
                    **opts,
                )
            )  # fmt: skip
        return outs

    compiled = jax.jit(program).lower(X, jax.random.key(0)).compile(FAST_COMPILE)
    outs = jax.block_until_ready(compiled(X, jax.random.key(0)))
    for k, (opts, n) in enumerate(runs):
        out, info = outs[k]
        assert np.isfinite(np.asarray(out)).all(), (opts, n)
        # dpm_adaptive chooses its steps: only the NFE it reports can be checked.
        expected = int(info["nfe"]) if SAMPLERS[name].adaptive else samplers.nfe(name, n, **opts)
        assert counts[k] == expected == int(info["nfe"]), (
            f"{name} {opts} num_steps={n}: {counts[k]} calls, nfe says {expected}"
        )


# ------------------------------------------------------------------ (b) one compiled program


def _jaxpr_stats(jaxpr):
    """(number of equations, number of denoiser call sites), recursing into sub-jaxprs."""
    n_eqns, n_calls = 0, 0
    for eqn in jaxpr.eqns:
        n_eqns += 1
        n_calls += eqn.primitive.name == "cbrt"
        for sub in jcore.jaxprs_in_params(eqn.params):
            e, c = _jaxpr_stats(sub)
            n_eqns, n_calls = n_eqns + e, n_calls + c
    return n_eqns, n_calls


@pytest.mark.parametrize("name,opts", CONFIGS, ids=CONFIG_IDS)
def test_program_size_independent_of_num_steps(name, opts):
    """The traced program for 10 and 200 steps has the same denoiser call sites and size: the loop
    is a lax.scan, not unrolled Python (compile time must not grow with num_steps)."""
    stats = []
    grid = "linspace" if SAMPLERS[name].default_grid == "lcm" else None  # lcm: n <= 50
    for n in (10, 200):
        fn = lambda x, rng, n=n: samplers.sample(
            _marked_denoiser, x, SCHEDULE, method=name, num_steps=n, rng=rng, grid=grid, **opts
        )
        stats.append(_jaxpr_stats(jax.make_jaxpr(fn)(X, jax.random.key(0)).jaxpr))
    (e10, c10), (e200, c200) = stats
    assert c10 == c200 and c10 >= 1, stats
    assert abs(e200 - e10) <= 0.03 * e10, stats


# ---------------------------------------------------------------------------- (c) errors


def _sample(**kw):
    args = {"method": "ddim", "num_steps": 3, "rng": jax.random.key(0)} | kw
    return samplers.sample(_marked_denoiser, X, SCHEDULE, **args)


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="unknown sampler 'nope'.*ddim"):
        _sample(method="nope")
    with pytest.raises(ValueError, match="unknown sampler"):
        samplers.nfe("nope", 3)
    with pytest.raises(ValueError, match="unknown grid 'nope'.*logsnr"):
        _sample(grid="nope")
    with pytest.raises(ValueError, match="unknown schedule 'nope'.*rectified_flow"):
        schedules.get("nope")


@pytest.mark.parametrize("name", METHODS)
def test_bad_arguments_raise(name):
    with pytest.raises(ValueError, match="num_steps"):
        _sample(method=name, num_steps=0)
    with pytest.raises(ValueError, match="does not take options.*valid"):
        _sample(method=name, not_an_option=1)
    with pytest.raises(ValueError, match="does not take options"):
        samplers.nfe(name, 3, not_an_option=1)
    for bad in ([1.0, 0.5, 0.5, 0.0], [0.5, 1.0, 0.2, 0.0]):  # repeated / increasing time
        with pytest.raises(ValueError, match="strictly decreasing"):
            _sample(method=name, grid=jnp.asarray(bad))
    with pytest.raises(ValueError, match="needs 4"):
        _sample(method=name, grid=jnp.asarray([1.0, 0.5, 0.0]))


@pytest.mark.parametrize("name", METHODS)
def test_unsupported_order_raises(name):
    m = SAMPLERS[name]
    if not m.orders:  # no `order` option: passing one is an unknown option
        with pytest.raises(ValueError, match="does not take options"):
            _sample(method=name, order=2)
        return
    assert _default_order(name) in m.orders
    for bad in (0, max(m.orders) + 1):
        with pytest.raises(ValueError, match="order"):
            _sample(method=name, order=bad)
        with pytest.raises(ValueError, match="order"):
            samplers.nfe(name, 3, order=bad)


@pytest.mark.parametrize("name", [n for n in METHODS if SAMPLERS[n].stochastic])
def test_stochastic_needs_rng(name):
    with pytest.raises(ValueError, match="rng"):
        _sample(method=name, rng=None)


def test_registry_entries_are_well_formed():
    for name, m in SAMPLERS.items():
        assert m.name == name
        assert m.default_grid in GRIDS, name
        assert m.paper, f"{name} names no paper"
        params = inspect.signature(m.run).parameters
        assert "rng" in params and params["rng"].kind == params["rng"].KEYWORD_ONLY, name
        assert ("order" in params) == bool(m.orders), f"{name}: orders vs `order` option"


# ----------------------------------------------------------------------------- (d) grids

GRID_SCHEDULES = {
    "linear": SCHEDULE,
    "vp_linear": schedules.get("vp_linear"),
    "vp_cosine": schedules.get("vp_cosine"),
    "rectified_flow": schedules.get("rectified_flow", shift=3.0),
    "edm": schedules.get("edm"),
}
DISCRETE_ONLY = ("linspace_multistep", "leading", "trailing", "lcm")


GRID_CASES = [(grid, sched_name) for grid in GRIDS for sched_name in sorted(GRID_SCHEDULES)]


def _t_start(schedule, grid):
    """Default first time: t_max, except logsnr/karras on flow (lambda(t_max) = -inf there)."""
    if grid in ("logsnr", "karras") and schedule.family == "flow":
        return schedule.t_max - schedule.t_min
    return schedule.t_max


@pytest.mark.parametrize("grid,sched_name", GRID_CASES)
def test_grid_shape_order_and_endpoints(grid, sched_name):
    schedule = GRID_SCHEDULES[sched_name]
    discrete = hasattr(schedule, "t_from_timestep")
    if grid in DISCRETE_ONLY and not discrete:
        with pytest.raises(ValueError, match="discrete"):
            samplers.time_grid(schedule, grid, 5)
        return
    for n in (1, 2, 7):
        ts = np.asarray(samplers.time_grid(schedule, grid, n))
        assert ts.shape == (n + 1,)
        assert np.all(np.diff(ts) < 0), ts
        assert ts[-1] == 0.0
        # diffusers' "leading" and multistep "linspace" start below t_max by construction, and
        # its 1-step "linspace" is timestep 0 (np.linspace(0, N - 1, 1)); test_diffusers_spacings
        # checks them.
        below = ("leading", "linspace_multistep")
        if grid not in below and not (grid == "linspace" and discrete and n == 1):
            np.testing.assert_allclose(ts[0], _t_start(schedule, grid), rtol=1e-6)
        assert ts[0] <= schedule.t_max * (1 + 1e-6)
    if grid not in DISCRETE_ONLY and not (grid == "linspace" and discrete):
        t_end = 2.0 * schedule.t_min
        ts = np.asarray(samplers.time_grid(schedule, grid, 6, t_end=t_end))
        assert ts.shape == (7,) and np.all(np.diff(ts) < 0)
        np.testing.assert_allclose([ts[0], ts[-1]], [_t_start(schedule, grid), t_end], rtol=1e-4)


SPACING_CASES = [
    (spacing, n, 0) for spacing in ("linspace", "leading", "trailing") for n in (1, 7, 10, 50)
] + [("leading", n, 1) for n in (7, 10)]  # steps_offset only shifts diffusers' "leading"


@pytest.mark.parametrize("spacing,num_steps,steps_offset", SPACING_CASES)
def test_diffusers_spacings(spacing, num_steps, steps_offset):
    ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
    ref.set_timesteps(num_steps)
    k = ref.timesteps.numpy().astype(np.float64)
    with jax.enable_x64(True):
        ts = samplers.time_grid(SCHEDULE, spacing, num_steps, steps_offset=steps_offset)
        expected = np.asarray(SCHEDULE.t_from_timestep(jnp.asarray(k)))
    np.testing.assert_allclose(np.asarray(ts[:-1]), expected, rtol=1e-12, atol=1e-12)
    assert float(ts[-1]) == 0.0


@pytest.mark.parametrize("num_steps", [1, 7, 10])
def test_multistep_and_lcm_spacings(num_steps):
    """ "linspace_multistep" is DPMSolverMultistepScheduler's (and UniPC's, DEIS's) "linspace";
    "lcm" is LCMScheduler's timesteps (original_inference_steps 50 and 20)."""
    refs = [(DPMSolverMultistepScheduler(), "linspace_multistep", {})]
    refs += [(LCMScheduler(original_inference_steps=o), "lcm", {"original_inference_steps": o})
             for o in (50, 20)]  # fmt: skip
    for ref, name, kw in refs:
        ref.set_timesteps(num_steps)
        k = ref.timesteps.numpy().astype(np.float64)
        with jax.enable_x64(True):
            ts = samplers.time_grid(SCHEDULE, name, num_steps, **kw)
            expected = np.asarray(SCHEDULE.t_from_timestep(jnp.asarray(k)))
        np.testing.assert_allclose(np.asarray(ts[:-1]), expected, rtol=1e-12, atol=1e-12)


def test_bad_input_of_new_methods():
    """LCM without a consistency model's schedule settings, thresholding on a sampler that does
    not predict data, adaptive tolerances <= 0: errors that say what to do."""
    flow = schedules.get("rectified_flow")
    with pytest.raises(ValueError, match="lcm needs a consistency model's discrete"):
        samplers.sample(_marked_denoiser, X, flow, method="lcm", num_steps=2, grid="uniform_t",
                        rng=jax.random.key(0))  # fmt: skip
    with pytest.raises(ValueError, match="grid 'lcm' needs a discrete"):
        samplers.time_grid(flow, "lcm", 4)
    with pytest.raises(ValueError, match="num_steps <= original_inference_steps"):
        samplers.time_grid(SCHEDULE, "lcm", 8, original_inference_steps=4)
    for name in ("euler", "dpm_solver", "pndm"):
        with pytest.raises(ValueError, match=f"{name} does not predict data.*dpmpp_2m"):
            _sample(method=name, thresholding=True)
    assert SAMPLERS["dpmpp_2m"].data_prediction and not SAMPLERS["ddim"].data_prediction
    for bad in (dict(rtol=0.0), dict(atol=-1e-3)):
        with pytest.raises(ValueError, match="rtol, atol and h_init must be > 0"):
            _sample(method="dpm_adaptive", **bad)
    with pytest.raises(ValueError, match="return_info=True"):
        samplers.nfe("dpm_adaptive", 5)
