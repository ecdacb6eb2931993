"""DPM-Solver++ (Lu et al. 2022b, arXiv:2211.01095): data-prediction exponential integrators.

    dpmpp_singlestep  singlestep DPM-Solver++(1/2/3S), option `order` (default 2, as diffusers).
                      intermediate="logsnr" (default): the paper's Algorithm 1 (r1 = 1/2; order 3
                      r1 = 1/3, r2 = 2/3), `order` NFE per step; intermediate="grid": diffusers'
                      DPMSolverSinglestepScheduler, one NFE per grid interval.
    dpmpp_2s          = dpmpp_singlestep with order 2 (DPM-Solver++(2S), Algorithm 1).
    dpmpp_multistep   multistep DPM-Solver++(1/2/3M), option `order` (default 2), diffusers'
                      DPMSolverMultistepScheduler (lower_order_final, euler_at_final).
    dpmpp_2m          = dpmpp_multistep with order 2 (Algorithm 2).
    dpmpp_3m          = dpmpp_multistep with order 3 (appendix).
    sde_dpmpp_2m      SDE-DPM-Solver++(2M) (sec. 5; diffusers algorithm_type="sde-dpmsolver++"),
                      stochastic: fresh N(0, I) per step from fold_in(rng, i), or `noises`.

The solver integrates x0_hat. A step to t = 0 (sigma = 0) is first order and returns x0_hat, as
diffusers' final_sigmas_type="zero". solver_type: "midpoint" (diffusers' default) or "heun". NFE
conventions as in dpm_solver.py: singlestep "logsnr" costs order * (num_steps - 1) + 1 on grids
ending at 0 (order * num_steps with t_end > 0); every other method costs num_steps.
"""

from __future__ import annotations

import functools

from diffusion.samplers import dpm_solver_multi as multi
from diffusion.samplers import dpm_solver_single as single
from diffusion.samplers.base import Method, check_order
from diffusion.samplers.dpm_solver import singlestep_nfe

PAPER = "DPM-Solver++ (Lu et al. 2022b, arXiv:2211.01095)"


run_singlestep = single.singlestep_runner(
    "dpmpp_singlestep",
    "dpmsolver++",
    2,
    """Singlestep DPM-Solver++(`order`S) over the grid ts.""",
)


def run_2s(
    denoise_fn,
    x,
    schedule,
    ts,
    *,
    rng=None,
    solver_type: str = "midpoint",
    intermediate: str = "logsnr",
    lower_order_final: bool = True,
):
    """DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1)."""
    return run_singlestep(
        denoise_fn, x, schedule, ts, rng=rng, order=2, solver_type=solver_type,
        intermediate=intermediate, lower_order_final=lower_order_final,
    )  # fmt: skip


run_multistep = multi.multistep_runner(
    "dpmpp_multistep",
    "dpmsolver++",
    """Multistep DPM-Solver++(`order`M) over the grid ts (diffusers' order rules).""",
)


def _fixed_order_multistep(order, doc):
    def run(
        denoise_fn,
        x,
        schedule,
        ts,
        *,
        rng=None,
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
    ):
        return run_multistep(
            denoise_fn, x, schedule, ts, order=order, solver_type=solver_type,
            lower_order_final=lower_order_final, euler_at_final=euler_at_final,
        )  # fmt: skip

    run.__doc__ = doc
    return run


run_2m = _fixed_order_multistep(2, "DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2).")


def run_3m(
    denoise_fn,
    x,
    schedule,
    ts,
    *,
    rng=None,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
    third_order: str = "diffusers",
):
    """DPM-Solver++(3M) (Lu et al. 2022b, appendix); third_order as in run_multistep."""
    return run_multistep(
        denoise_fn, x, schedule, ts, order=3, solver_type=solver_type,
        lower_order_final=lower_order_final, euler_at_final=euler_at_final,
        third_order=third_order,
    )  # fmt: skip


def run_sde_2m(
    denoise_fn,
    x,
    schedule,
    ts,
    *,
    rng=None,
    noises=None,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
):
    """SDE-DPM-Solver++(2M): diffusers' "sde-dpmsolver++" update with solver_order=2.

    noises: None (draw N(0, I) from fold_in(rng, i) at step i) or (num_steps, *x.shape) normals.
    """
    single.check_options("sde_dpmpp_2m", solver_type)
    return multi.run_multistep(
        denoise_fn, x, schedule, ts, algorithm="sde-dpmsolver++", order=2,
        solver_type=solver_type, lower_order_final=lower_order_final,
        euler_at_final=euler_at_final, rng=rng, noises=noises,
    )  # fmt: skip


def _nfe_singlestep(num_steps, *, order=2, intermediate="logsnr", **_):
    check_order("dpmpp_singlestep", order, (1, 2, 3))
    return singlestep_nfe(num_steps, order, intermediate)


def _nfe_steps(num_steps, *, order=2, **_):
    check_order("dpmpp_multistep", order, (1, 2, 3))
    return num_steps


_M = functools.partial(Method, paper=PAPER)
METHODS = {
    "dpmpp_singlestep": _M(
        "dpmpp_singlestep", run_singlestep, _nfe_singlestep, default_grid="logsnr",
        orders=(1, 2, 3),
    ),
    "dpmpp_2s": _M(
        "dpmpp_2s", run_2s, functools.partial(_nfe_singlestep, order=2), default_grid="logsnr"
    ),
    "dpmpp_multistep": _M("dpmpp_multistep", run_multistep, _nfe_steps, orders=(1, 2, 3)),
    "dpmpp_2m": _M("dpmpp_2m", run_2m, lambda num_steps, **_: num_steps),
    "dpmpp_3m": _M("dpmpp_3m", run_3m, lambda num_steps, **_: num_steps),
    "sde_dpmpp_2m": _M(
        "sde_dpmpp_2m", run_sde_2m, lambda num_steps, **_: num_steps, stochastic=True,
        paper=PAPER + ", SDE-DPM-Solver++(2M), sec. 5",
    ),
}  # fmt: skip
