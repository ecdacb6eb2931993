"""DPM-Solver (Lu et al. 2022, NeurIPS, arXiv:2206.00927): noise-prediction exponential integrators.

    dpm_solver            singlestep DPM-Solver-1/2/3 (Algorithms 1-2, eqs. 3.7-3.8 / appendix),
                          option `order` (default 3). intermediate="logsnr" (default, the paper):
                          each step inserts r1 = 1/2 (order 2) or r1 = 1/3, r2 = 2/3 (order 3)
                          points in logSNR and costs `order` NFE; intermediate="grid": diffusers'
                          DPMSolverSinglestepScheduler(algorithm_type="dpmsolver"), one NFE per
                          grid interval with grid points as intermediate times.
    dpm_solver_fast       DPM-Solver-fast (sec. 3.4): num_steps is the NFE BUDGET N, not the
                          number of steps. K = floor(N/3) + 1 steps uniform in logSNR between the
                          grid's end points, order 3 except the last one or two (N mod 3).
    dpm_solver_multistep  multistep DPM-Solver-1/2/3 (Lu et al. 2022b, appendix; diffusers
                          DPMSolverMultistepScheduler(algorithm_type="dpmsolver")), option `order`.

The solver integrates eps_hat = (x_t - alpha_t x0_hat) / sigma_t. A step to t = 0 (sigma = 0) is
first order and returns x0_hat (see dpm_solver_single). NFE counts (`nfe`) assume the grid ends at
t = 0, the default grids' convention: singlestep "logsnr" then costs order * (num_steps - 1) + 1;
with a grid ending at t_end > 0 (the paper's convention) it costs order * num_steps. The other
methods cost exactly num_steps NFE with either kind of grid.
"""

from __future__ import annotations

from diffusion.samplers import dpm_solver_multi as multi
from diffusion.samplers import dpm_solver_single as single
from diffusion.samplers.base import Method, check_order

PAPER = "DPM-Solver (Lu et al. 2022, NeurIPS, arXiv:2206.00927)"


def singlestep_nfe(num_steps: int, order: int, intermediate: str, ends_at_zero: bool = True):
    """NFE of singlestep DPM-Solver / DPM-Solver++ (the last step to t = 0 is first order)."""
    if intermediate == "grid":
        return num_steps
    return order * num_steps - (order - 1) * int(ends_at_zero)


run = single.singlestep_runner(
    "dpm_solver",
    "dpmsolver",
    3,
    """Singlestep DPM-Solver-`order` (noise prediction) over the grid ts.""",
)


def nfe(num_steps, *, order=3, solver_type="midpoint", intermediate="logsnr", **_):
    check_order("dpm_solver", order, (1, 2, 3))
    return singlestep_nfe(num_steps, order, intermediate)


def run_fast(denoise_fn, x, schedule, ts, *, rng=None, solver_type: str = "midpoint"):
    """DPM-Solver-fast with NFE budget num_steps (see dpm_solver_single.run_fast)."""
    del rng
    single.check_options("dpm_solver_fast", solver_type)
    return single.run_fast(
        denoise_fn, x, schedule, ts, algorithm="dpmsolver", solver_type=solver_type
    )


run_multistep = multi.multistep_runner(
    "dpm_solver_multistep",
    "dpmsolver",
    """Multistep DPM-Solver-`order` (noise prediction), diffusers' order rules.""",
)


def _nfe_multistep(num_steps, *, order=2, **_):
    check_order("dpm_solver_multistep", order, (1, 2, 3))
    return num_steps


METHODS = {
    "dpm_solver": Method(
        "dpm_solver", run, nfe, default_grid="logsnr", orders=(1, 2, 3), paper=PAPER
    ),
    "dpm_solver_fast": Method(
        "dpm_solver_fast",
        run_fast,
        lambda num_steps, **_: num_steps,
        default_grid="logsnr",
        paper=PAPER + ", DPM-Solver-fast",
    ),
    "dpm_solver_multistep": Method(
        "dpm_solver_multistep",
        run_multistep,
        _nfe_multistep,
        orders=(1, 2, 3),
        paper="Multistep DPM-Solver (Lu et al. 2022b, arXiv:2211.01095, appendix)",
    ),
}
