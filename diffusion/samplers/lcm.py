"""LCM: multistep latent consistency sampling (Luo et al. 2023, arXiv:2310.04378, Algorithm 3;
Song et al. 2023, Consistency Models, Algorithm 1; diffusers' LCMScheduler).

A consistency model maps x_t to the data end of its ODE trajectory with the boundary-condition
parametrisation (Luo et al. eq. 5; Song et al. sec. 3.1) on the discrete timestep k:

    f(x_t, t) = c_skip(k) x_t + c_out(k) x0_hat(x_t, t),
    c_skip = sigma_data^2 / ((k s)^2 + sigma_data^2),  c_out = k s / sqrt((k s)^2 + sigma_data^2),

with s = timestep_scaling (10) and sigma_data = 0.5 (diffusers' values), so f(x, 0) = x. Multistep
sampling alternates f and re-noising to the next grid time with fresh noise:

    x_{i+1} = alpha_{i+1} f(x_i, t_i) + sigma_{i+1} z_i,

which on the default grids ends with x_N = f(x_{N-1}, t_{N-1}) (t_N = 0). The timesteps are the
"lcm" grid: num_steps of the original_inference_steps distillation timesteps (grids.py; for a
model distilled with another count, pass grid=time_grid(schedule, "lcm", n,
original_inference_steps=k)). The consistency scalings use the DDPM-table timestep index, so lcm
needs a discrete schedule.
"""

from __future__ import annotations

from diffusion.samplers import base
from diffusion.samplers.base import Method, alpha_sigma, methods, scan_steps


def boundary_scalings(k, timestep_scaling: float, sigma_data: float):
    """(c_skip, c_out) of LCMScheduler.get_scalings_for_boundary_condition_discrete."""
    scaled = k * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def lcm(
    denoise_fn, x, schedule, ts, *, rng=None, noises=None, timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
):  # fmt: skip
    """Multistep latent consistency sampling (Luo et al. 2023, Algorithm 3; LCMScheduler.step).

    noises: None (z_i from fold_in(rng, i)) or (num_steps, *x.shape) normals (the last, which
    multiplies sigma = 0 on the default grids, is unused there).
    """
    if not hasattr(schedule, "t_from_timestep"):
        raise ValueError(
            "lcm needs a consistency model's discrete (DDPM-table) schedule, e.g. "
            "schedules.get('scaled_linear'): its boundary scalings c_skip, c_out are functions of "
            f"the timestep index; got {type(schedule).__name__}"
        )
    if timestep_scaling <= 0 or sigma_data <= 0:
        raise ValueError(f"lcm: timestep_scaling and sigma_data must be > 0, got "
                         f"{timestep_scaling}, {sigma_data}")  # fmt: skip
    n = ts.shape[0] - 1
    noises = base.check_noises(noises, n, x, rng, method="lcm")
    dtype = x.dtype

    def step(x, inp):
        i, t, t_next = inp
        c_skip, c_out = boundary_scalings(schedule.model_time(t), timestep_scaling, sigma_data)
        f = c_skip.astype(dtype) * x + c_out.astype(dtype) * denoise_fn(x, t)
        a_next, s_next = alpha_sigma(schedule, t_next, dtype)
        return a_next * f + s_next * base.step_noise(rng, noises, i, x)

    return scan_steps(step, x, ts)


METHODS = methods(
    lcm=Method(
        lcm, stochastic=True, default_grid="lcm", data_prediction=True,
        paper="Luo et al. 2023, Latent Consistency Models (arXiv:2310.04378)",
    ),
)  # fmt: skip
