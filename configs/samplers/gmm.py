"""Sampler benchmark on a built-in Gaussian mixture with its exact denoiser (the main job).

    python -m experiments.benchmark_samplers --config configs/samplers/gmm.py --workdir /tmp/bench

For every (method, NFE): RMS error against the reference ODE solution from the same x_T (scipy
DOP853 with the exact denoiser; the closed-form map for `:gaussian`), sliced W2 and mean exact
log-likelihood against the true data, NFE used, compile seconds and sampling milliseconds; then the
empirical convergence order of each deterministic method. dpm_adaptive runs once per (rtol, atol)
and reports the NFE it used. Writes report.md, metrics.jsonl, error_vs_nfe.png and samples.png.
Default: 2-D overlapping 8-mode GMM, VP-linear schedule, logSNR grid ending at t_min; about a
minute on an idle 2-core CPU.

Variants after a colon, comma-separated: `gaussian` (single Gaussian, exact reference), `flow`
(rectified flow, shift 3, uniform-t grid), `image` (8x8 image mixture), `runlocal` (tiny; tests).
Leaf overrides: `--config.nfes='(10,20)' --config.methods='ddim,dpmpp_2m'`.
"""

import ml_collections

DETERMINISTIC = (
    "ddim,euler,heun,midpoint,rk4,dpm_solver:order=2,dpm_solver:order=3,dpm_solver_fast,"
    "dpm_solver_multistep:order=2,dpm_solver_multistep:order=3,dpmpp_2s,dpmpp_2m,dpmpp_3m,"
    "unipc:order=2,unipc:order=3,deis,pndm,plms,lms"
)
STOCHASTIC = (
    "ddpm,sde_dpmpp_2m,euler_ancestral,dpmpp_2s_ancestral,dpmpp_sde,dpmpp_2m_sde,dpmpp_3m_sde"
)
# lcm is left out: it needs a consistency model (and its discrete schedule), not a denoiser.


def get_config(arg=None):
    variants = set(filter(None, (arg or "").split(",")))
    known = {"gaussian", "flow", "image", "runlocal"}
    if variants - known:
        raise ValueError(f"unknown variants {sorted(variants - known)}; valid: {sorted(known)}")
    c = ml_collections.ConfigDict()
    c.data = "gaussian2d" if "gaussian" in variants else "gmm2d"
    if "image" in variants:
        c.data = "gmm_image"
    c.schedule = "rectified_flow" if "flow" in variants else "vp_linear"
    c.shift = 3.0  # only used by rectified_flow
    c.grid = "uniform_t" if "flow" in variants else "logsnr"
    c.t_end = "t_min"  # DPM-Solver convention: stop at the smallest trained time
    c.methods = DETERMINISTIC + "," + STOCHASTIC
    c.nfes = (6, 10, 20, 50)
    # Adaptive methods choose their steps: one run per (rtol, atol); the row's NFE is what it used.
    c.adaptive = "dpm_adaptive"
    c.tolerances = ((0.05, 0.0078), (1e-3, 1e-4), (1e-5, 1e-6))
    c.num_samples = 2000
    c.timing_repeats = 3
    c.compile_check = "dpmpp_2m,rk4"  # compile time at 10 vs 200 steps, reported
    c.seed = 0
    c.x64 = True  # float64 so high-order errors are not floored by float32 round-off
    c.scatter_nfe = 10
    if "runlocal" in variants:
        c.methods = "ddim,heun,dpmpp_2m,dpm_solver_fast,ddpm"
        c.nfes = (6, 12)
        c.tolerances = ((0.05, 0.0078),)
        c.num_samples = 200
        c.timing_repeats = 1
        c.compile_check = "dpmpp_2m"
    return c
