"""Parity with k-diffusion's sampling module (Crowson; PyPI k-diffusion 0.1.1.post1), the
independent implementation most WebUI samplers come from: same denoiser, same x_T, same Karras
sigmas, same noise, float64 on both sides; final samples to 1e-4 relative, and the denoiser calls
k-diffusion makes equal our info["nfe"].

The bridge. k-diffusion integrates in (x, sigma) with a denoiser D(x, sigma): the VE / EDM
variables. Our EDM schedule (alpha = 1, sigma = t) is that space itself: denoise_fn(x, t) =
D(x, t), the same x_T = sigma_max z, and our named grid "karras" equals get_sigmas_karras(n,
0.002, 80) plus a final 0 (checked to 1e-12), so no hand-built timesteps. For a VP schedule,
x_t / alpha_t = x_0 + (sigma_t / alpha_t) eps is the VE state at sigma = sigma_t / alpha_t, so the
VP denoiser is D_vp(x, t) = D(x / alpha_t, sigma_t / alpha_t) and the VP run from x_T = alpha_T x~_T
on the grid with sigma_t / alpha_t = k-diffusion's sigmas must end at k-diffusion's x_0
(alpha_0 = 1). Our samplers are written to commute with that change of variables (exponential
integrators in lambda, ODE solvers in x / alpha, ancestral splits in sigma / alpha);
test_vp_bridge checks it on three of them.

Noise. The ancestral samplers take k-diffusion's `noise_sampler`, which we hand our noises
(NoiseFeed). The SDE samplers draw from a torchsde Brownian tree (two correlated draws per
dpmpp_sde step): we record them (NoiseRecorder) and feed ours the same as `noises`.

k-diffusion is loaded without its package imports (see _reference.load_k_diffusion_sampling).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _reference import EDMDenoiser, NoiseFeed, NoiseRecorder, load_k_diffusion_sampling, rel_err

from diffusion import samplers, schedules

pytestmark = pytest.mark.filterwarnings("ignore:Should have t")  # torchsde float32 interval ends
B, D, N = 3, 4, 8
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
DEN = EDMDenoiser(D)
_rs = np.random.RandomState(0)
Z_T = _rs.randn(B, D)
NOISES = _rs.randn(N, B, D)

# (k-diffusion sampler, its kwargs, our method, our options, noise: None | "feed" | "tree" | "tree2")
CASES = [
    ("sample_euler", {}, "euler", {}, None),
    ("sample_heun", {}, "heun", {}, None),
    ("sample_dpm_2", {}, "dpm_solver", dict(order=2), None),
    ("sample_lms", {}, "lms", {}, None),
    ("sample_dpmpp_2m", {}, "dpmpp_2m", dict(lower_order_final=False), None),
    ("sample_euler_ancestral", {}, "euler_ancestral", {}, "feed"),
    ("sample_dpmpp_2s_ancestral", {}, "dpmpp_2s_ancestral", {}, "feed"),
    ("sample_dpmpp_sde", {}, "dpmpp_sde", {}, "tree2"),
    ("sample_dpmpp_2m_sde", {}, "dpmpp_2m_sde", {}, "tree"),
    (
        "sample_dpmpp_2m_sde",
        dict(solver_type="heun", eta=0.5, s_noise=0.8),
        "dpmpp_2m_sde",
        dict(solver_type="heun", eta=0.5, s_noise=0.8),
        "tree",
    ),
    ("sample_dpmpp_3m_sde", {}, "dpmpp_3m_sde", {}, "tree"),
]


@pytest.fixture(scope="module")
def kd():
    module = load_k_diffusion_sampling()
    if module is None:
        pytest.skip("k-diffusion is not installed: pip install --no-deps k-diffusion==0.1.1.post1")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # k-diffusion builds sigmas / times with the default
    with jax.enable_x64(True):
        yield module
    torch.set_default_dtype(old)


class Counted:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, x, sigma):
        self.n += 1
        return self.fn(x, sigma)


def reference(kd, name, kw, noise, sigmas, x_T):
    """(x_0, denoiser calls, the noises drawn as our `noises` array or None)."""
    x = torch.from_numpy(np.asarray(x_T))
    extra, rec = {}, None
    if noise == "feed":
        extra["noise_sampler"] = NoiseFeed(NOISES)
    elif noise in ("tree", "tree2"):
        lo, hi = torch.as_tensor(sigmas[sigmas > 0].min()), torch.as_tensor(sigmas.max())
        rec = NoiseRecorder(kd.BrownianTreeNoiseSampler(x, lo, hi, seed=3))
        extra["noise_sampler"] = rec
    model = Counted(DEN.torch)
    out = getattr(kd, name)(model, x, torch.tensor(sigmas), disable=True, **kw, **extra)
    noises = NOISES if noise == "feed" else None
    if rec is not None:
        noises = rec.per_step(N, 2 if noise == "tree2" else None)
    return out.numpy(), model.n, noises


def ours(method, schedule, denoise_fn, x_T, grid, noises, **opts):
    extra = {} if noises is None else {"noises": jnp.asarray(noises)}

    def run(x):
        return samplers.sample(
            denoise_fn, x, schedule, method=method, num_steps=len(grid) - 1, grid=grid,
            rng=jax.random.key(0), return_info=True, **extra, **opts,
        )  # fmt: skip

    out, info = jax.jit(run)(jnp.asarray(x_T))
    return np.asarray(out), int(info["nfe"])


@pytest.mark.parametrize("name,kw,method,opts,noise", CASES, ids=[c[0] + str(c[1]) for c in CASES])
def test_parity_edm(kd, name, kw, method, opts, noise):
    edm = schedules.get("edm")
    grid = np.asarray(samplers.time_grid(edm, "karras", N))
    sigmas = kd.get_sigmas_karras(N, SIGMA_MIN, SIGMA_MAX).numpy()
    np.testing.assert_allclose(grid, sigmas, rtol=1e-12, atol=0)
    ref, calls, noises = reference(kd, name, kw, noise, sigmas, SIGMA_MAX * Z_T)
    got, nfe = ours(method, edm, DEN.jax, SIGMA_MAX * Z_T, grid, noises, **opts)
    print(f"k-diffusion {name} {kw}: max rel err {rel_err(got, ref):.1e}, NFE {nfe}")
    assert rel_err(got, ref) < 1e-4, rel_err(got, ref)
    assert nfe == calls == samplers.nfe(method, N, **opts)


@pytest.mark.parametrize("order", [3])
def test_parity_dpm_adaptive(kd, order):
    """sample_dpm_adaptive from sigma_max to sigma_min: same accepted / rejected steps (NFE)."""
    model = Counted(DEN.torch)
    x = torch.from_numpy(SIGMA_MAX * Z_T)
    ref, info_ref = kd.sample_dpm_adaptive(
        model, x, SIGMA_MIN, SIGMA_MAX, order=order, disable=True, return_info=True
    )
    edm = schedules.get("edm")
    den = DEN.jax
    fn = jax.jit(
        lambda x: samplers.sample(
            den, x, edm, method="dpm_adaptive", num_steps=1, grid=jnp.asarray([80.0, 0.002]),
            order=order, return_info=True,
        )
    )  # fmt: skip
    got, info = fn(jnp.asarray(SIGMA_MAX * Z_T))
    print(
        f"k-diffusion sample_dpm_adaptive: max rel err {rel_err(got, ref.numpy()):.1e}, {info_ref}"
    )
    assert rel_err(got, ref.numpy()) < 1e-4, rel_err(got, ref.numpy())
    assert int(info["nfe"]) == info_ref["nfe"] == model.n
    assert (int(info["n_accept"]), int(info["n_reject"])) == (
        info_ref["n_accept"],
        info_ref["n_reject"],
    )


VP_CASES = [c for c in CASES if c[2] in ("lms", "dpmpp_2s_ancestral", "dpmpp_sde")]


@pytest.mark.parametrize("name,kw,method,opts,noise", VP_CASES, ids=[c[2] for c in VP_CASES])
def test_vp_bridge(kd, name, kw, method, opts, noise):
    """A VP run (x, t) equals k-diffusion's VE run (x / alpha, sigma / alpha): module docstring."""
    vp = schedules.get("vp_linear")
    grid = samplers.time_grid(vp, "karras", N)
    sigmas = np.asarray(jnp.exp(-vp.logsnr(grid)))  # sigma / alpha, a final 0
    ref, calls, noises = reference(kd, name, kw, noise, sigmas, sigmas[0] * Z_T)

    def den_vp(x, t):
        alpha = vp.alpha(t)
        return DEN.jax(x / alpha, vp.sigma(t) / alpha)

    x_T = float(vp.alpha(grid[0])) * sigmas[0] * Z_T
    got, nfe = ours(method, vp, den_vp, x_T, np.asarray(grid), noises, **opts)
    print(f"k-diffusion {name} on VP: max rel err {rel_err(got, ref):.1e}")
    assert rel_err(got, ref) < 1e-4, rel_err(got, ref)
    assert nfe == calls
