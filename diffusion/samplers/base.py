"""What every sampler family module provides: `Method` records in a module-level METHODS dict.

A method's `run(denoise_fn, x, schedule, ts, *, rng, **options) -> x_0` integrates from ts[0] to
ts[-1] over the decreasing (num_steps + 1,) grid `ts`, as one `jax.lax.scan` (one XLA program whose
compile time does not grow with num_steps). `nfe(num_steps, **options)` is the exact number of
denoiser calls the run makes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    run: Callable
    nfe: Callable[..., int]
    stochastic: bool = False
    default_grid: str = "linspace"
    orders: tuple[int, ...] = ()  # values the `order` option may take; () if it has none
    paper: str = ""


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
