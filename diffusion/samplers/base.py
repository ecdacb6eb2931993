"""What every sampler family module provides, and the helpers they all use.

A family module defines one plain function per method,

    method(denoise_fn, x, schedule, ts, *, rng=None, **options) -> x_0,

which integrates from ts[0] to ts[-1] over the decreasing (num_steps + 1,) grid `ts` as one
`jax.lax.scan` (one XLA program whose compile time does not grow with num_steps), and a
module-level `METHODS = methods(name=Method(function, ...))` dict: the registry key is the method's
name. `Method.nfe(num_steps, **options)` is the exact number of denoiser calls (num_steps unless
the method says otherwise).

Helpers shared by the families: `alpha_sigma` / `point` (alpha_t, sigma_t (, lambda_t) in the
state's dtype),
`check_noises` / `step_noise` (the standard normal noise of step i, injected or drawn from the
rng), `check_order`, `scan_steps`, `dynamic_threshold`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp


def steps_nfe(num_steps: int, **_) -> int:
    """One denoiser call per step: the NFE of most methods."""
    return num_steps


@dataclasses.dataclass(frozen=True)
class Method:
    run: Callable
    nfe: Callable[..., int] = steps_nfe
    stochastic: bool = False
    default_grid: str = "linspace"
    orders: tuple[int, ...] = ()  # values the `order` option may take; () if it has none
    paper: str = ""
    data_prediction: bool = False  # integrates x0_hat: `thresholding` applies (sample())
    adaptive: bool = False  # chooses its own steps; run returns (x, info) with the NFE used
    name: str = ""  # the registry key, set by `methods`


def methods(**entries: Method) -> dict[str, Method]:
    """A family's registry: each Method is named after its keyword."""
    return {name: dataclasses.replace(m, name=name) for name, m in entries.items()}


def check_order(method: str, order: int, supported) -> int:
    if order not in supported:
        raise ValueError(f"{method} supports order in {tuple(supported)}, got order={order}")
    return order


def scan_steps(step, carry, ts):
    """Run `step(carry, (i, t_cur, t_next)) -> carry` over consecutive grid pairs with lax.scan."""
    n = ts.shape[0] - 1
    xs = (jnp.arange(n), ts[:-1], ts[1:])
    carry, _ = jax.lax.scan(lambda c, x: (step(c, x), None), carry, xs)
    return carry


def alpha_sigma(schedule, t, dtype):
    """(alpha_t, sigma_t) in the dtype of the state."""
    return jnp.asarray(schedule.alpha(t), dtype), jnp.asarray(schedule.sigma(t), dtype)


class Point(NamedTuple):
    """Schedule values at one time: alpha_t, sigma_t, lambda_t."""

    alpha: jax.Array
    sigma: jax.Array
    lam: jax.Array


def point(schedule, t, dtype) -> Point:
    """alpha_t, sigma_t, lambda_t in the dtype of the state."""
    return Point(*alpha_sigma(schedule, t, dtype), jnp.asarray(schedule.logsnr(t), dtype))


def check_noises(noises, num_steps: int, x, rng=None, method: str | None = None, per_step=None):
    """Validate injected noise: an array (num_steps, *x.shape), or (num_steps, per_step, *x.shape)
    for methods that draw per_step normals a step; or None.

    With `method` given, the run is stochastic: it needs rng or noises.
    """
    if method is not None and rng is None and noises is None:
        raise ValueError(f"{method} is stochastic: pass rng=jax.random.key(...) or noises")
    if noises is None:
        return None
    noises = jnp.asarray(noises, x.dtype)
    want = (num_steps, *x.shape) if per_step is None else (num_steps, per_step, *x.shape)
    if noises.shape != want:
        names = "(num_steps, *x.shape)" if per_step is None else "(num_steps, per_step, *x.shape)"
        raise ValueError(f"noises has shape {noises.shape}; expected {names} = {want}")
    return noises


def step_noise(rng, noises, i, x, per_step=None):
    """Standard normal noise for step i: noises[i] if injected, else drawn with fold_in(rng, i);
    shape x.shape, or (per_step, *x.shape)."""
    if noises is not None:
        return noises[i]
    shape = x.shape if per_step is None else (per_step, *x.shape)
    return jax.random.normal(jax.random.fold_in(rng, i), shape, x.dtype)


def dynamic_threshold(x0_hat, ratio: float = 0.995, max_value: float = 1.0):
    """Dynamic thresholding (Saharia et al. 2022, Imagen, sec. 2.3; diffusers' `_threshold_sample`).

    Per sample, s = the `ratio` quantile of |x0_hat| over all non-batch axes, clipped to
    [1, max_value]; x0_hat is clipped to [-s, s] and divided by s, so it lies in [-1, 1].
    """
    flat = x0_hat.reshape(x0_hat.shape[0], -1)  # (B, D)
    s = jnp.clip(jnp.quantile(jnp.abs(flat), ratio, axis=1, keepdims=True), 1.0, max_value)
    return (jnp.clip(flat, -s, s) / s).reshape(x0_hat.shape)
