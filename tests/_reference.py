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


def rel_err(a, b):
    """max |a - b| / max |b| (the parity tests' relative error)."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


class NoiseFeed:
    """Feeds fixed noise to a reference sampler: call it (as diffusers' `randn_tensor` or
    k-diffusion's `noise_sampler`) and it returns the next row of `noises`."""

    def __init__(self, noises):
        self.noises, self.calls = noises, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return torch.from_numpy(np.asarray(self.noises[self.calls - 1]))


class NoiseRecorder:
    """Wraps a reference noise sampler (k-diffusion's / diffusers' BrownianTreeNoiseSampler) and
    records what it returns, so that our sampler can be fed the same noise afterwards."""

    def __init__(self, sampler):
        self.sampler, self.out = sampler, []

    def __call__(self, sigma, sigma_next):
        z = self.sampler(sigma, sigma_next)
        self.out.append(z.double().numpy())
        return z

    def per_step(self, num_steps, per_step=None):
        """The recorded draws as (num_steps, [per_step,] *shape), zeros where none was drawn
        (references draw nothing on the step to sigma = 0)."""
        k = per_step or 1
        z = np.stack(self.out)  # (calls, *shape)
        rows = np.zeros((num_steps * k, *z.shape[1:]))
        rows[: len(z)] = z
        return rows.reshape(num_steps, *(() if per_step is None else (k,)), *z.shape[1:])


def diffusers_loop(sched, model_torch, x, noises=None, module=None, monkeypatch=None):
    """Run a diffusers scheduler over its timesteps from x (scale_model_input where it has one).

    noises: fed to `module.randn_tensor` (the schedulers that draw their own noise) in order."""
    if noises is not None:
        monkeypatch.setattr(module, "randn_tensor", NoiseFeed(noises))
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        x = sched.step(model_torch(inp, t), t, x).prev_sample
    return x.double().numpy()


class EDMDenoiser:
    """A fixed denoiser D(x, sigma) with EDM preconditioning (Karras et al. 2022, table 1):
    c_skip x + c_out tanh(c_in x W + b cos(log(sigma) / 4)), sigma_data = 0.5; torch for
    k-diffusion, jax for us. Smooth and O(1) at every sigma, so no step cancels large numbers."""

    def __init__(self, dim: int, seed: int = 1):
        rs = np.random.RandomState(seed)
        self.w, self.bias = rs.randn(dim, dim) / np.sqrt(dim), rs.randn(dim)

    def _d(self, x, sigma, xp, w, b):
        sd2 = 0.25
        c_in = 1.0 / xp.sqrt(sigma**2 + sd2)
        f = xp.tanh((x * c_in) @ w + b * xp.cos(0.25 * xp.log(sigma)))
        return sd2 / (sigma**2 + sd2) * x + sigma * 0.5 * c_in * f

    def torch(self, x, sigma):
        sigma = sigma.reshape(-1, 1).double()  # k-diffusion passes (B,) sigmas
        return self._d(x, sigma, torch, torch.from_numpy(self.w), torch.from_numpy(self.bias))

    def jax(self, x, sigma):
        return self._d(x, sigma, jnp, jnp.asarray(self.w), jnp.asarray(self.bias))


def load_k_diffusion_sampling():
    """k-diffusion's sampling module (PyPI k-diffusion 0.1.1.post1), without its package imports.

    `import k_diffusion` imports its training code (kornia, clip, wandb, torchvision, ...), and its
    utils.py imports torchvision, which does not import beside the CPU torch here (so k-diffusion
    is installed with --no-deps, see .ci/run). sampling.py itself needs scipy, torchdiffeq,
    torchsde, tqdm and `utils.append_dims`. So: sampling.py and utils.py are loaded from the
    installed package's folder as modules of a private package `_k_diffusion`, utils.py with a
    throwaway stand-in for torchvision.transforms.functional (which append_dims does not use),
    removed from sys.modules right after. Returns None if k-diffusion is not installed.
    """
    import importlib.util
    import pathlib
    import sys
    import types

    if "_k_diffusion.sampling" in sys.modules:
        return sys.modules["_k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        return None
    folder = pathlib.Path(spec.origin).parent
    pkg = types.ModuleType("_k_diffusion")
    pkg.__path__ = [str(folder)]
    sys.modules["_k_diffusion"] = pkg

    def load(name):
        s = importlib.util.spec_from_file_location(f"_k_diffusion.{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(s)
        sys.modules[s.name] = module
        s.loader.exec_module(module)
        setattr(pkg, name, module)
        return module

    stubs = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional"]
    assert not any(name in sys.modules for name in stubs), "a real torchvision is imported"
    for name in stubs:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules[stubs[2]]
    try:
        load("utils")
    finally:
        for name in stubs:
            del sys.modules[name]
    return load("sampling")
