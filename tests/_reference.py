"""Shared pieces of the sampler parity tests (diffusers schedulers vs our samplers).

`TanhNet` is a fixed, smooth "network" of (x, timestep), written once in torch and once in jax,
that both sides call from the same x_T: the solver is under test, not the network. `Counter`
counts denoiser calls at run time (jax.debug.callback fires once per executed call).
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch


class TanhNet:
    """out = tanh(x W (0.5 + k / 1000) + b cos(k / 300)); W, b and x_T drawn from one seed."""

    def __init__(self, batch: int, dim: int, seed: int = 0):
        rs = np.random.RandomState(seed)
        self.w = rs.randn(dim, dim) / np.sqrt(dim)
        self.bias = rs.randn(dim)
        self.x_T = rs.randn(batch, dim)

    def torch(self, x, k):
        k = float(k)
        x = x.double()
        w, b = torch.from_numpy(self.w), torch.from_numpy(self.bias)
        return torch.tanh(x @ w * (0.5 + k / 1000) + b * np.cos(k / 300))

    def jax(self, x, k):
        w, b = jnp.asarray(self.w), jnp.asarray(self.bias)
        return jnp.tanh(x @ w * (0.5 + k / 1000) + b * jnp.cos(k / 300))


class Counter:
    """Counts denoiser calls at run time."""

    def __init__(self):
        self.n = 0

    def inc(self):
        self.n += 1

    def wrap(self, den):
        def f(x, t):
            jax.debug.callback(self.inc)
            return den(x, t)

        return f
