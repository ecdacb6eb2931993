"""Noise schedules as pure functions of continuous time.

Convention (DESIGN.md section 2): data at t = 0, noise at t = t_max,

    x_t = alpha(t) * x_0 + sigma(t) * eps,      lambda(t) = log(alpha(t) / sigma(t))  (logSNR / 2).

Every schedule is a frozen (hashable) dataclass, so it can be a static argument of `jax.jit`.
Methods take and return jnp arrays and follow the active float precision (float64 under
`jax.enable_x64`). All schedules give alpha(0) = 1, sigma(0) = 0 exactly: t = 0 is clean data, the
last point of the default sampling grids. `t_min` is the smallest time the network is trained on,
`model_time(t)` the timestep value the network takes.

Families: "vp" (alpha^2 + sigma^2 = 1), "flow" (alpha + sigma = 1), "ve" (alpha = 1).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np


class Schedule:
    """Base class: subclasses define log_alpha, log_sigma, t_from_logsnr, model_time."""

    family: str = ""
    t_min: float = 0.0
    t_max: float = 1.0

    def log_alpha(self, t):
        raise NotImplementedError

    def log_sigma(self, t):
        raise NotImplementedError

    def alpha(self, t):
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t):
        return jnp.exp(self.log_sigma(t))

    def logsnr(self, t):
        """lambda(t) = log(alpha / sigma); +inf at t = 0."""
        return self.log_alpha(t) - self.log_sigma(t)

    def t_from_logsnr(self, lam):
        raise NotImplementedError

    def t_from_sigma_ratio(self, ratio):
        """Time at which sigma / alpha equals `ratio` (the EDM / k-diffusion sigma)."""
        return self.t_from_logsnr(-jnp.log(ratio))

    def model_time(self, t):
        raise NotImplementedError


def _vp_log_sigma(log_alpha):
    # sigma = sqrt(1 - alpha^2), computed stably: log(-expm1(2 log_alpha)) / 2.
    return 0.5 * jnp.log(-jnp.expm1(2.0 * log_alpha))


def _vp_log_alpha_from_logsnr(lam):
    # alpha^2 = sigmoid(2 lambda) for VP schedules.
    return -0.5 * jnp.logaddexp(0.0, -2.0 * lam)


# ----------------------------------------------------------------------------- discrete DDPM


def betas_for(beta_schedule: str, n: int, beta_start: float, beta_end: float) -> np.ndarray:
    """The beta tables of diffusers' DDPMScheduler, in float64."""
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal (2021), eq. 17, betas clipped at 0.999.
        def abar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)])
    raise ValueError(
        f"unknown beta_schedule {beta_schedule!r}; valid: {sorted(_DISCRETE_DEFAULTS)}"
    )


_DISCRETE_DEFAULTS = {
    "linear": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "squaredcos_cap_v2": (None, None),
}


@dataclasses.dataclass(frozen=True)
class DiscreteVP(Schedule):
    """A DDPM beta table as a continuous-time VP schedule.

    As DPM-Solver's discrete `NoiseScheduleVP` (Lu et al. 2022, appendix), diffusers timestep k in
    0..N-1 sits at t_k = (k + 1) / N and log alpha is linearly interpolated in t between table
    points; t = 0 is added as (log alpha = 0), the clean data. model_time(t) = N t - 1 is the
    (fractional) diffusers timestep index.

    zero_terminal_snr: the table rescaled to zero SNR at the last timestep (Lin et al. 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", algorithm 1; diffusers'
    `rescale_betas_zero_snr`), so that training at t = 1 sees pure noise as sampling starts from.
    The last alphas_cumprod is then set to 2**-24 rather than 0, as diffusers' Euler and
    DPM-Solver schedulers do, which keeps logSNR finite for every sampler. Use with v-prediction
    (eps carries no information about x0 at zero SNR).
    """

    beta_schedule: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None
    zero_terminal_snr: bool = False
    family = "vp"

    def __post_init__(self):
        if self.beta_schedule not in _DISCRETE_DEFAULTS:
            raise ValueError(
                f"unknown beta_schedule {self.beta_schedule!r}; valid: {sorted(_DISCRETE_DEFAULTS)}"
            )
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")

    @property
    def t_min(self):
        return 1.0 / self.num_train_timesteps

    @property
    def t_max(self):
        return 1.0

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """(N,) float64, diffusers' `alphas_cumprod`."""
        lo, hi = _DISCRETE_DEFAULTS[self.beta_schedule]
        start = self.beta_start if self.beta_start is not None else lo
        end = self.beta_end if self.beta_end is not None else hi
        betas = betas_for(self.beta_schedule, self.num_train_timesteps, start, end)
        abar = np.cumprod(1.0 - betas)
        if self.zero_terminal_snr:
            root = np.sqrt(abar)  # shift sqrt(abar) to end at 0, scale it to keep its start
            root = (root - root[-1]) * root[0] / (root[0] - root[-1])
            abar = root**2
            abar[-1] = 2.0**-24
        return abar

    @functools.cached_property
    def _table(self):
        n = self.num_train_timesteps
        ts = np.arange(n + 1, dtype=np.float64) / n  # (N+1,) 0, 1/N, ..., 1
        log_alpha = np.concatenate([[0.0], 0.5 * np.log(self.alphas_cumprod)])
        return ts, log_alpha

    def log_alpha(self, t):
        ts, la = self._table
        return jnp.interp(t, jnp.asarray(ts), jnp.asarray(la))

    def log_sigma(self, t):
        return _vp_log_sigma(self.log_alpha(t))

    def t_from_logsnr(self, lam):
        ts, la = self._table
        log_alpha = _vp_log_alpha_from_logsnr(lam)
        # log_alpha decreases in t, so interpolate on the flipped table.
        return jnp.interp(log_alpha, jnp.asarray(la[::-1]), jnp.asarray(ts[::-1]))

    def model_time(self, t):
        return self.num_train_timesteps * t - 1.0

    def t_from_timestep(self, k):
        """Continuous time of (integer or fractional) diffusers timestep k."""
        return (jnp.asarray(k) + 1.0) / self.num_train_timesteps


# -------------------------------------------------------------------------- continuous VP


@dataclasses.dataclass(frozen=True)
class VPLinear(Schedule):
    """Continuous VP-SDE with linear beta(t) (Song et al. 2021; DPM-Solver's 'linear').

    log alpha(t) = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2. model_time(t) = 1000 t.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0
    family = "vp"

    def log_alpha(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def log_sigma(self, t):
        return _vp_log_sigma(self.log_alpha(t))

    def t_from_logsnr(self, lam):
        # Inverse of log_alpha(t) (DPM-Solver, NoiseScheduleVP.inverse_lambda).
        tmp = 2.0 * (self.beta_max - self.beta_min) * jnp.logaddexp(-2.0 * lam, 0.0)
        delta = self.beta_min**2 + tmp
        return tmp / (jnp.sqrt(delta) + self.beta_min) / (self.beta_max - self.beta_min)

    def model_time(self, t):
        return 1000.0 * t


@dataclasses.dataclass(frozen=True)
class VPCosine(Schedule):
    """Continuous cosine VP schedule (Nichol & Dhariwal 2021), t_max = 0.9946 as in DPM-Solver.

    log alpha(t) = log cos((t + s) / (1 + s) * pi / 2) - log cos(s / (1 + s) * pi / 2).
    """

    s: float = 0.008
    t_min: float = 1e-3
    t_max: float = 0.9946
    family = "vp"

    @property
    def _log_alpha_0(self):
        return math.log(math.cos(self.s / (1.0 + self.s) * math.pi / 2.0))

    def log_alpha(self, t):
        la = jnp.log(jnp.cos((t + self.s) / (1.0 + self.s) * jnp.pi / 2.0)) - self._log_alpha_0
        return jnp.where(t <= 0, 0.0, la)  # exact clean data at t = 0 despite rounding

    def log_sigma(self, t):
        return _vp_log_sigma(self.log_alpha(t))

    def t_from_logsnr(self, lam):
        log_alpha = _vp_log_alpha_from_logsnr(lam)
        return (
            2.0 * (1.0 + self.s) / jnp.pi * jnp.arccos(jnp.exp(log_alpha + self._log_alpha_0))
            - self.s
        )

    def model_time(self, t):
        return 1000.0 * t


# ---------------------------------------------------------------------- flow and VE (EDM)


@dataclasses.dataclass(frozen=True)
class RectifiedFlow(Schedule):
    """Rectified flow (Liu et al. 2022; Esser et al. 2024, SD3): alpha = 1 - sigma.

    sigma(t) = shift t / (1 + (shift - 1) t) is SD3's timestep shift (eq. 23), so a uniform grid
    in t is diffusers' shifted FlowMatch grid. model_time(t) = 1000 sigma(t) (SD3 timesteps).
    """

    shift: float = 1.0
    num_train_timesteps: int = 1000
    family = "flow"

    def __post_init__(self):
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    @property
    def t_min(self):
        return 1.0 / self.num_train_timesteps

    @property
    def t_max(self):
        return 1.0

    def sigma(self, t):
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def alpha(self, t):
        return 1.0 - self.sigma(t)

    def log_alpha(self, t):
        return jnp.log1p(-self.sigma(t))

    def log_sigma(self, t):
        return jnp.log(self.sigma(t))

    def t_from_sigma(self, sigma):
        return sigma / (self.shift - (self.shift - 1.0) * sigma)

    def t_from_logsnr(self, lam):
        return self.t_from_sigma(jnp.exp(-jnp.logaddexp(0.0, lam)))  # sigma = sigmoid(-lam)

    def model_time(self, t):
        return self.num_train_timesteps * self.sigma(t)


@dataclasses.dataclass(frozen=True)
class EDM(Schedule):
    """Variance-exploding schedule in EDM sigma-time (Karras et al. 2022): alpha = 1, sigma = t.

    model_time(t) = log(t) / 4 is EDM's c_noise; sigma_data is kept for preconditioning.
    """

    t_min: float = 0.002
    t_max: float = 80.0
    sigma_data: float = 0.5
    family = "ve"

    def alpha(self, t):
        return jnp.ones_like(jnp.asarray(t, dtype=jnp.result_type(float)))

    def sigma(self, t):
        return jnp.asarray(t, dtype=jnp.result_type(float))

    def log_alpha(self, t):
        return jnp.zeros_like(jnp.asarray(t, dtype=jnp.result_type(float)))

    def log_sigma(self, t):
        return jnp.log(t)

    def t_from_logsnr(self, lam):
        return jnp.exp(-lam)

    def model_time(self, t):
        return 0.25 * jnp.log(t)


# ---------------------------------------------------------------------------- registry

SCHEDULES = {
    "linear": functools.partial(DiscreteVP, beta_schedule="linear"),
    "scaled_linear": functools.partial(DiscreteVP, beta_schedule="scaled_linear"),
    "squaredcos_cap_v2": functools.partial(DiscreteVP, beta_schedule="squaredcos_cap_v2"),
    "vp_linear": VPLinear,
    "vp_cosine": VPCosine,
    "rectified_flow": RectifiedFlow,
    "edm": EDM,
}


def get(name: str, **kw) -> Schedule:
    """Build a schedule by name, e.g. get("scaled_linear"), get("rectified_flow", shift=3.0)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {sorted(SCHEDULES)}")
    return SCHEDULES[name](**kw)


def from_diffusers_config(cfg: dict) -> Schedule:
    """The schedule of a diffusers scheduler config (scheduler_config.json as a dict)."""
    cls = cfg.get("_class_name", "")
    if cls.startswith("FlowMatch"):
        if cfg.get("use_dynamic_shifting"):
            raise ValueError("FlowMatch use_dynamic_shifting is not supported; pass a fixed shift")
        return RectifiedFlow(
            shift=float(cfg.get("shift", 1.0)),
            num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
        )
    if cfg.get("trained_betas") is not None:
        raise ValueError("trained_betas is not supported")
    name = cfg.get("beta_schedule", "linear")
    kw = {"num_train_timesteps": int(cfg.get("num_train_timesteps", 1000))}
    if cfg.get("rescale_betas_zero_snr"):
        kw["zero_terminal_snr"] = True
    if name != "squaredcos_cap_v2":
        kw |= {k: float(cfg[k]) for k in ("beta_start", "beta_end") if k in cfg}
    return get(name, **kw)
