"""A diffusers scheduler_config.json -> our sampler method, options, time grid and x_T scale.

diffusers keeps the sampler and its timestep grid in one stateful scheduler object; here they are
a method name from `samplers.SAMPLERS` (plus options) and an explicit grid of continuous times
(schedules.py: t = (k + 1) / N for DDPM timestep k, t = t_from_sigma for flow). The grid is
computed the way each diffusers class's `set_timesteps` computes its timesteps and sigmas, so
the same model function and x_T give diffusers' samples (tests/test_pipelines_schedulers.py
checks every class and spacing against `set_timesteps`, and runs the tiny SD pipeline against
diffusers' with each scheduler whose method has no other pipeline test).

    diffusers class                   method (options)                                  grid
    DDIMScheduler                     ddim                                              ddim
    DDPMScheduler                     ddpm (variance)                                   ddim
    PNDMScheduler                     pndm (PRK warm-up); plms if skip_prk_steps        ddim
    LMSDiscreteScheduler              lms (order=4, diffusers' step default)            kdiff
    EulerDiscreteScheduler            euler                                             kdiff
    EulerAncestralDiscreteScheduler   euler_ancestral (eta=1)                           kdiff
    HeunDiscreteScheduler             heun                                              kdiff
    DPMSolverSDEScheduler             dpmpp_sde                                         kdiff
    DPMSolverMultistepScheduler       dpmpp_multistep / dpm_solver_multistep (order,    multistep
                                      solver_type, lower_order_final, euler_at_final);
                                      sde-dpmsolver++: sde_dpmpp_2m (its order rules)
    DPMSolverSinglestepScheduler      dpmpp_singlestep / dpm_solver                     multistep
                                      (order, intermediate="grid")
    UniPCMultistepScheduler           unipc (order, variant, lower_order_final)         multistep
    DEISMultistepScheduler            deis (order=solver_order, lower_order_final)      multistep
    LCMScheduler                      lcm (timestep_scaling)                            lcm
    FlowMatchEulerDiscreteScheduler   euler (on the rectified-flow schedule)            flow

thresholding=True (Saharia et al. 2022) adds `thresholding`, `dynamic_thresholding_ratio` and
`sample_max_value` to the options of the data-prediction methods (Method.data_prediction:
dpmpp_multistep, sde_dpmpp_2m, dpmpp_singlestep, lcm), where diffusers thresholds x0_hat before
the update exactly as samplers.sample's denoiser wrapper; for the others it is warned and ignored.
The stochastic methods (euler_ancestral, dpmpp_sde, sde_dpmpp_2m, lcm) draw their normals from
the pipeline's rng, diffusers from its torch generator (DPMSolverSDE: a torchsde Brownian tree
seeded by noise_sampler_seed, ignored here): equal in law; a pipeline call's `sampler_noises`
(the method's `noises` option) feeds a reference's draws. Grid families:

    ddim       DDIM / DDPM / PNDM: integer timesteps, num_steps points (linspace rounded,
               leading with steps_offset, trailing); last step to t = 0, or to timestep 0
               (t = 1/N) when set_alpha_to_one is False.
    multistep  DPM-Solver / UniPC / DEIS: linspace(0, N-1, num_steps + 1)[:-1] style spacings;
               final_sigmas_type "zero" (t = 0) or "sigma_min" (t = 1/N); Karras sigmas.
    kdiff      Euler / Euler-a / Heun / LMS / DPM-SDE (k-diffusion style): fractional timesteps,
               sigma interpolated linearly in the timestep; Karras sigmas; last sigma 0.
    lcm        LCM: num_steps of the original_inference_steps distillation timesteps (samplers'
               "lcm" grid), then t = 0.
    flow       FlowMatchEuler: sigmas linspace(1, shift(1/N)) shifted again (as diffusers).

x_T: diffusers scales its `latents` by `init_noise_sigma` into its own state; the k-diffusion
schedulers' state is x / alpha. `init_scale` gives the factor from diffusers' `latents` to our
state x = alpha x0 + sigma eps: init_noise_sigma * alpha(t_0) for kdiff (1 with "leading"
spacing, sigma(t_0) with "linspace" / "trailing"), 1 for the others.

Not exact: Karras sigmas (the network sees model_time of the exact sigma, diffusers the rounded
or log-interpolated timestep); DDIM/DDPM/PNDM "linspace" steps, and PNDM "trailing" steps when
num_steps does not divide N, go to k - N // num_steps in diffusers, not to the next grid timestep
("leading", SD1's, is exact); PNDM's PRK midpoint is timestep k - (N // num_steps) // 2, ours
the exact midpoint (equal when N // num_steps is even); sde-dpmsolver++ of order 1 or 3 and
sde-dpmsolver run sde_dpmpp_2m (warned).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import samplers, schedules


@dataclasses.dataclass(frozen=True)
class Entry:
    family: str  # grid family: ddim | multistep | kdiff | lcm | flow
    method: Any  # str, or cfg -> (method, options)
    options: tuple[tuple[str, Any], ...] = ()  # with a str method
    defaults: tuple[tuple[str, Any], ...] = ()  # the class's own defaults where they differ


_LEADING = (("timestep_spacing", "leading"),)


def _ddpm(cfg):
    variance = cfg.get("variance_type", "fixed_small")
    known = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
             "fixed_large": "fixed_large", "fixed_large_log": "fixed_large"}  # fmt: skip
    if variance not in known:
        raise ValueError(f"DDPMScheduler variance_type {variance!r}: supported {sorted(known)}")
    return "ddpm", {"variance": known[variance]}


def _multistep_options(cfg):
    return {
        "solver_type": cfg.get("solver_type", "midpoint"),
        "lower_order_final": bool(cfg.get("lower_order_final", True)),
        "euler_at_final": bool(cfg.get("euler_at_final", False)),
    }


def _dpm_multistep(cfg):
    algorithm, order = cfg.get("algorithm_type", "dpmsolver++"), int(cfg.get("solver_order", 2))
    opts = _multistep_options(cfg)
    if algorithm == "dpmsolver++":
        return "dpmpp_multistep", {"order": order, **opts}
    if algorithm == "dpmsolver":
        return "dpm_solver_multistep", {"order": order, **opts}
    if algorithm in ("sde-dpmsolver++", "sde-dpmsolver"):
        # sde_dpmpp_2m is diffusers' sde-dpmsolver++ order 2 with its order rules (dpmpp_2m_sde
        # is k-diffusion's: no lower_order_final); diffusers' order 3 has a sign slip
        # (samplers/dpm_multistep.py), order 1 and the noise-prediction SDE are not here.
        if algorithm == "sde-dpmsolver" or order != 2:
            warnings.warn(
                f"DPMSolverMultistep {algorithm} order {order} is not implemented: using "
                "sde_dpmpp_2m (sde-dpmsolver++ order 2)",
                stacklevel=3,
            )
        return "sde_dpmpp_2m", opts
    raise ValueError(
        f"DPMSolverMultistepScheduler algorithm_type {algorithm!r}: supported "
        "dpmsolver++, dpmsolver, sde-dpmsolver++, sde-dpmsolver"
    )


def _dpm_singlestep(cfg):
    algorithm = cfg.get("algorithm_type", "dpmsolver++")
    if algorithm not in ("dpmsolver++", "dpmsolver"):
        raise ValueError(f"DPMSolverSinglestepScheduler algorithm_type {algorithm!r} unsupported")
    method = "dpmpp_singlestep" if algorithm == "dpmsolver++" else "dpm_solver"
    return method, {
        "order": int(cfg.get("solver_order", 2)),
        "solver_type": cfg.get("solver_type", "midpoint"),
        "intermediate": "grid",
        "lower_order_final": bool(cfg.get("lower_order_final", True)),
    }


def _unipc(cfg):
    if not cfg.get("predict_x0", True) or cfg.get("disable_corrector"):
        warnings.warn(
            "UniPC predict_x0=False / disable_corrector are not supported; ignored", stacklevel=3
        )
    return "unipc", {
        "order": int(cfg.get("solver_order", 2)),
        "variant": cfg.get("solver_type", "bh2"),
        "lower_order_final": bool(cfg.get("lower_order_final", True)),
    }


def _pndm(cfg):
    return ("plms" if cfg.get("skip_prk_steps") else "pndm"), {}


def _deis(cfg):
    # diffusers turns algorithm_type dpmsolver(++) into deis and every solver_type into logrho
    return "deis", {
        "order": int(cfg.get("solver_order", 2)),
        "lower_order_final": bool(cfg.get("lower_order_final", True)),
    }


def _lcm(cfg):
    return "lcm", {"timestep_scaling": float(cfg.get("timestep_scaling", 10.0))}


SCHEDULERS: dict[str, Entry] = {
    "DDIMScheduler": Entry("ddim", "ddim", (), _LEADING),
    "DDPMScheduler": Entry("ddim", _ddpm, (), _LEADING),
    "PNDMScheduler": Entry("ddim", _pndm, (), (*_LEADING, ("set_alpha_to_one", False))),
    "LMSDiscreteScheduler": Entry("kdiff", "lms", (("order", 4),)),
    "EulerDiscreteScheduler": Entry("kdiff", "euler"),
    "EulerAncestralDiscreteScheduler": Entry("kdiff", "euler_ancestral", (("eta", 1.0),)),
    "HeunDiscreteScheduler": Entry("kdiff", "heun"),
    "DPMSolverSDEScheduler": Entry("kdiff", "dpmpp_sde"),
    "DPMSolverMultistepScheduler": Entry("multistep", _dpm_multistep),
    "DPMSolverSinglestepScheduler": Entry("multistep", _dpm_singlestep),
    "UniPCMultistepScheduler": Entry("multistep", _unipc),
    "DEISMultistepScheduler": Entry(  # DEIS always ends at timestep 0
        "multistep", _deis, (), (("final_sigmas_type", "sigma_min"),)
    ),
    "LCMScheduler": Entry("lcm", _lcm),
    "FlowMatchEulerDiscreteScheduler": Entry("flow", "euler"),
}
# Options that would change results and that nothing here implements (thresholding: only for
# the data-prediction methods, see from_config).
_UNSUPPORTED = {
    "thresholding": True, "clip_sample": True, "use_exponential_sigmas": True,
    "use_beta_sigmas": True, "use_lu_lambdas": True, "use_flow_sigmas": True,
    "invert_sigmas": True, "stochastic_sampling": True, "shift_terminal": "any",
    "timestep_type": "continuous", "interpolation_type": "log_linear",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SchedulerSpec:
    """A folder's scheduler as our method + options, schedule, prediction type and grid rule.

    `config` holds the scheduler_config.json items (sorted, for hashing)."""

    class_name: str
    method: str
    options: tuple[tuple[str, Any], ...]
    schedule: schedules.Schedule
    prediction_type: str
    family: str
    config: tuple[tuple[str, Any], ...]

    def get(self, key, default=None):
        return dict(self.config).get(key, default)

    def timesteps_and_sigmas(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """diffusers' (timesteps, sigmas) after set_timesteps(num_steps), in float64; sigmas
        are sigma / alpha (VP) or sigma (flow), with the final value appended."""
        return _GRIDS[self.family](self, num_steps)

    def grid(self, num_steps: int) -> np.ndarray:
        """The decreasing float64 times our sampler steps through (num_steps + 1 points, one
        fewer when diffusers' final DDIM step is to the same noise level)."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        _, sigmas = self.timesteps_and_sigmas(num_steps)
        ts = times_from_sigmas(self.schedule, sigmas)
        keep = np.concatenate([[True], np.diff(ts) < 0])  # DDIM: k = 0 then "timestep 0"
        return ts[keep]

    def init_scale(self, ts: np.ndarray) -> float:
        """Factor from diffusers' `latents` (standard normal) to our x_T at ts[0]."""
        if self.family != "kdiff":
            return 1.0
        ratio = float(np.exp(-self._logsnr(ts[0])))  # sigma / alpha at t_0
        alpha = 1.0 / np.sqrt(1.0 + ratio**2)
        leading = self.get("timestep_spacing", "linspace") not in ("linspace", "trailing")
        init_noise_sigma = np.sqrt(ratio**2 + 1.0) if leading else ratio
        return float(init_noise_sigma * alpha)

    def _logsnr(self, t):
        with jax.enable_x64(True):
            return float(self.schedule.logsnr(jnp.asarray(t, jnp.float64)))


def times_from_sigmas(schedule: schedules.Schedule, sigmas: np.ndarray) -> np.ndarray:
    """Continuous times of diffusers sigmas (sigma / alpha for VP tables, sigma for flow);
    table values of DDPM timesteps give exactly (k + 1) / N."""
    sigmas = np.asarray(sigmas, np.float64)
    if schedule.family == "flow":
        return np.asarray(schedule.t_from_sigma(sigmas), np.float64)
    table = np.sqrt((1.0 - schedule.alphas_cumprod) / schedule.alphas_cumprod)
    ts = np.zeros_like(sigmas)
    with jax.enable_x64(True):
        positive = sigmas > 0
        lam = -np.log(sigmas[positive])
        ts[positive] = np.asarray(schedule.t_from_logsnr(jnp.asarray(lam)), np.float64)
    for i, s in enumerate(sigmas):  # snap exact table values (no interpolation round-off)
        k = np.flatnonzero(np.isclose(table, s, rtol=1e-12, atol=0))
        if len(k):
            ts[i] = (k[0] + 1.0) / schedule.num_train_timesteps
    return ts


# ----------------------------------------------------------------------------- grid families


def _spacing(spec, n, *, plus_one: bool, integer: bool):
    """diffusers timestep spacings (set_timesteps), decreasing; plus_one: the multistep
    schedulers' linspace(0, N-1, n + 1)[:-1] convention."""
    n_train, spacing = spec.schedule.num_train_timesteps, spec.get("timestep_spacing", "linspace")
    offset = int(spec.get("steps_offset", 0))
    m = n + 1 if plus_one else n
    if spacing == "linspace":
        k = np.linspace(0, n_train - 1, m)
        k = (k.round() if integer else k)[::-1]
    elif spacing == "leading":
        k = (np.arange(m) * (n_train // m)).round()[::-1] + offset
    elif spacing == "trailing":
        k = np.round(np.arange(n_train, 0, -n_train / n)) - 1
    else:
        raise ValueError(f"timestep_spacing {spacing!r}: supported linspace, leading, trailing")
    return (k[:n] if plus_one and spacing != "trailing" else k).astype(np.float64)


def _table_sigmas(spec):
    acp = spec.schedule.alphas_cumprod
    return np.sqrt((1.0 - acp) / acp)


def _karras(sigma_max, sigma_min, n, rho=7.0):
    """Karras et al. 2022, eq. 5 (diffusers `_convert_to_karras`)."""
    ramp = np.linspace(0, 1, n)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _grid_ddim(spec, n):
    k = _spacing(spec, n, plus_one=False, integer=True)
    table = _table_sigmas(spec)
    final_to_zero = spec.class_name == "DDPMScheduler" or spec.get("set_alpha_to_one", True)
    return k, np.concatenate([table[k.astype(int)], [0.0 if final_to_zero else table[0]]])


def _grid_multistep(spec, n):
    if spec.class_name == "DPMSolverSinglestepScheduler":
        spec = dataclasses.replace(spec, config=(*spec.config, ("timestep_spacing", "linspace")))
    k = _spacing(spec, n, plus_one=True, integer=True)
    table = _table_sigmas(spec)
    sig = table[k.astype(int)]
    if spec.get("use_karras_sigmas"):
        sig = _karras(table[-1], table[0], n)
    last = {"zero": 0.0, "sigma_min": table[0]}[spec.get("final_sigmas_type", "zero")]
    return k, np.concatenate([sig, [last]])


def _grid_kdiff(spec, n):
    k = _spacing(spec, n, plus_one=False, integer=False)
    sig = np.interp(k, np.arange(spec.schedule.num_train_timesteps), _table_sigmas(spec))
    if spec.get("use_karras_sigmas"):
        sig = _karras(spec.get("sigma_max") or sig[0], spec.get("sigma_min") or sig[-1], n)
    last = {"zero": 0.0, "sigma_min": sig[-1]}[spec.get("final_sigmas_type", "zero")]
    return k, np.concatenate([sig, [last]])


def _grid_lcm(spec, n):
    """LCMScheduler.set_timesteps: the samplers' "lcm" grid (its timesteps are table points)."""
    original = int(spec.get("original_inference_steps", 50))
    ts = np.asarray(samplers.time_grid(spec.schedule, "lcm", n, original_inference_steps=original))
    k = np.round(ts[:-1] * spec.schedule.num_train_timesteps - 1.0)
    return k, np.concatenate([_table_sigmas(spec)[k.astype(int)], [0.0]])


def _grid_flow(spec, n):
    shift, n_train = spec.schedule.shift, spec.schedule.num_train_timesteps
    shifted = lambda s: shift * s / (1 + (shift - 1) * s)
    sig = shifted(np.linspace(1.0, shifted(1.0 / n_train), n))  # diffusers shifts twice
    return sig * n_train, np.concatenate([sig, [0.0]])


_GRIDS = {
    "ddim": _grid_ddim,
    "multistep": _grid_multistep,
    "kdiff": _grid_kdiff,
    "lcm": _grid_lcm,
    "flow": _grid_flow,
}


# ----------------------------------------------------------------------------- from config


def _check_config(cfg: dict, supported=()):
    bad = []
    for key, value in _UNSUPPORTED.items():
        v = cfg.get(key)
        if v is None or v is False or key in supported:
            continue
        if value == "any" or v == value:
            bad.append(f"{key}={v!r}")
    if bad:
        msg = f"{cfg.get('_class_name')} options not implemented here, ignored: {', '.join(bad)}"
        warnings.warn(msg, stacklevel=3)


def _resolve(entry: Entry, cfg: dict) -> tuple[str, dict]:
    """(method, options) of a config; dynamic thresholding where the method takes it."""
    if callable(entry.method):
        method, options = entry.method(cfg)
    else:
        method, options = entry.method, dict(entry.options)
    if cfg.get("thresholding") and samplers.get(method).data_prediction:
        options |= {k: type(v)(cfg.get(k, v)) for k, v in samplers.THRESHOLDING.items()}
    return method, options


def from_config(cfg: dict) -> SchedulerSpec:
    """SchedulerSpec of a scheduler_config.json dict (see the module docstring's table)."""
    name = cfg.get("_class_name", "")
    if name not in SCHEDULERS:
        raise ValueError(f"unsupported scheduler {name!r}; supported: {sorted(SCHEDULERS)}")
    entry = SCHEDULERS[name]
    cfg = {**dict(entry.defaults), **cfg}
    if cfg.get("timestep_spacing", "linspace") not in ("linspace", "leading", "trailing"):
        raise ValueError(f"timestep_spacing {cfg['timestep_spacing']!r} is not supported")
    method, options = _resolve(entry, cfg)
    _check_config(cfg, supported=options)
    prediction = "velocity" if entry.family == "flow" else cfg.get("prediction_type", "epsilon")
    frozen = tuple(sorted((k, _freeze(v)) for k, v in cfg.items()))
    return SchedulerSpec(
        class_name=name,
        method=method,
        options=tuple(sorted(options.items())),
        schedule=schedules.from_diffusers_config(cfg),
        prediction_type=prediction,
        family=entry.family,
        config=frozen,
    )


def _freeze(v):
    return tuple(_freeze(x) for x in v) if isinstance(v, list | tuple) else v
