"""Pieces of experiments/benchmark_throughput.py: the same network in ours (Flax NNX, jit) and
diffusers (PyTorch) with the same weights, timers, XLA FLOPs / memory, the analytic MMDiT FLOP
count, and the sharded-train-step child process (run as ``python -m experiments.throughput_lib``).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from diffusion import models
from diffusion.models import convert
from diffusion.models.presets import class_name, get_preset

F32 = jnp.float32


# ----------------------------------------------------------------------------- timing


def now_sync(x=None) -> float:
    """perf_counter after the device work behind x (jax pytree or torch tensor) is done."""
    if type(x).__module__.startswith("torch"):
        import torch

        if x.is_cuda:
            torch.cuda.synchronize()
    elif x is not None:
        jax.block_until_ready(x)
    return time.perf_counter()


def interleaved(
    fns: dict[str, Callable], repeats: int, warmup: int = 1, stat=statistics.median
) -> dict[str, float]:
    """Median (or `stat`) seconds per call of each fn, calls interleaved round-robin so that
    the load of a shared machine hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            now_sync(fn())
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            times[k].append(now_sync(fn()) - t0)
    return {k: stat(v) for k, v in times.items()}


def matmul_peak(n: int, dtype, repeats: int) -> float:
    """Measured matmul FLOP/s: a jitted (n, n) @ (n, n) in `dtype`, best of repeats (a peak:
    the median under-measures it on a shared machine, which pushed MFU above 1)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    sec = interleaved({"mm": lambda: f(a)}, max(repeats, 5), stat=min)["mm"]
    return 2 * n**3 / sec


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class Variant:
    """A compute setting of our model: dtype of activations, remat, attention implementation."""

    name: str
    dtype: object = F32
    remat: bool = False
    attn: str | None = None

    @classmethod
    def parse(cls, name: str) -> Variant:
        """'fp32', 'bf16', 'bf16_remat', 'bf16_cudnn', 'fp32_xla', ... (underscore-joined)."""
        parts = name.split("_")
        known = {"fp32", "bf16", "remat", "xla", "cudnn"}
        if set(parts) - known:
            raise ValueError(f"unknown variant part(s) {set(parts) - known} in {name!r}: {known}")
        dtype = jnp.bfloat16 if "bf16" in parts else F32
        attn = "cudnn" if "cudnn" in parts else "xla" if "xla" in parts else None
        return cls(name, dtype, "remat" in parts, attn)


def arch_dict(entry) -> dict:
    """The diffusers config.json dict of a benchmark entry: a preset plus overrides."""
    d = get_preset(entry.preset)
    arch = entry.get("arch")
    if arch is not None:
        d.update(arch.to_dict() if hasattr(arch, "to_dict") else dict(arch))
    return d


def _our_config(d: dict, variant: Variant):
    cls, config_cls = models.get_model(class_name(d))
    return cls, config_cls.from_diffusers(d, remat=variant.remat, attn_implementation=variant.attn)


def build_pair(d: dict, device: str, seed: int = 0):
    """(ours fp32, diffusers) with the same weights: the diffusers class random-initialised
    by PyTorch (eager, no compile) and its state dict loaded into our module (strict)."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    tmodel = getattr(diffusers, class_name(d)).from_config(d).eval()
    cls, config = _our_config(d, Variant("fp32"))
    ours = models.build_abstract(cls, config)
    convert.load_torch_state_dict(ours, {k: v.numpy() for k, v in tmodel.state_dict().items()})
    return ours, tmodel.to(device)


def build_ours(d: dict, variant: Variant, base: nnx.Module) -> nnx.Module:
    """Our module in another compute variant, sharing base's (fp32) parameters."""
    cls, config = _our_config(d, variant)
    model = models.build_abstract(cls, config, dtype=variant.dtype)
    nnx.update(model, nnx.state(base, nnx.Param))
    return model


def build_torch(d: dict, ours: nnx.Module, device: str):
    """The diffusers PyTorch class of d, holding exactly our weights (in-memory copy)."""
    import diffusers
    import torch

    model = getattr(diffusers, class_name(d)).from_config(d)
    state = {k: torch.from_numpy(v) for k, v in convert.to_torch_state_dict(ours).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers = {k for k, _ in model.named_buffers()}
    if unexpected or set(missing) - buffers:
        raise RuntimeError(f"weight copy: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval()


def make_inputs(d: dict, entry, batch: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random NHWC inputs for one call of the model family of d (latent side `size`)."""
    rng = np.random.default_rng(seed)
    kind = class_name(d)
    n = lambda *s: rng.standard_normal(s).astype(np.float32)
    if kind == "AutoencoderKL":
        return {"z": n(batch, size, size, d["latent_channels"])}
    t = rng.uniform(0, 1000, (batch,)).astype(np.float32)
    if kind == "UNet2DConditionModel":
        ctx = n(batch, entry.text_len, d["cross_attention_dim"])
        return {"x": n(batch, size, size, d["in_channels"]), "t": t, "ctx": ctx}
    ctx = n(batch, entry.text_len, d["joint_attention_dim"])
    pooled = n(batch, d["pooled_projection_dim"])
    return {"x": n(batch, size, size, d["in_channels"]), "t": t, "ctx": ctx, "pooled": pooled}


def apply_ours(model, inp: dict) -> jax.Array:
    if "z" in inp:
        return model.decode(inp["z"])
    if "pooled" in inp:
        return model(inp["x"], inp["ctx"], inp["pooled"], inp["t"])
    return model(inp["x"], inp["t"], inp["ctx"])


def apply_torch(model, inp: dict):
    """The diffusers call on NCHW tensors (inp already torch tensors, NCHW where spatial)."""
    if "z" in inp:
        return model.decode(inp["z"]).sample
    if "pooled" in inp:
        return model(
            hidden_states=inp["x"],
            encoder_hidden_states=inp["ctx"],
            pooled_projections=inp["pooled"],
            timestep=inp["t"],
        ).sample
    return model(inp["x"], inp["t"], encoder_hidden_states=inp["ctx"]).sample


def to_torch_inputs(inp: dict, device: str, dtype=None) -> dict:
    import torch

    out = {}
    for k, v in inp.items():
        t = torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2) if v.ndim == 4 else v))
        out[k] = t.to(device=device, dtype=dtype if (dtype and k != "t") else t.dtype)
    return out


# ----------------------------------------------------------------------------- compiled fns


def compile_stats(jitted, *args) -> tuple[Callable, dict]:
    """Lower + compile with timings, XLA FLOPs and memory (DESIGN.md section 5)."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    mem = compiled.memory_analysis()
    stats = {
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "flops": float(cost.get("flops", float("nan"))) if cost else float("nan"),
        "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0)),
        "arg_bytes": int(getattr(mem, "argument_size_in_bytes", 0)),
    }
    return compiled, stats


def ours_forward(model, inp: dict):
    """(call(), stats): jitted forward over (params, inputs)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    fn = jax.jit(lambda p, x: apply_ours(nnx.merge(graphdef, p, rest), x))
    args = (params, jax.tree.map(jnp.asarray, inp))
    compiled, stats = compile_stats(fn, *args)
    return (lambda: compiled(*args)), stats


def mse_step(graphdef, rest, tx, apply):
    """Pure train step: MSE to a target, AdamW update (fwd + bwd + optimizer)."""

    def step(params, opt, inp, target):
        def loss_fn(p):
            out = apply(nnx.merge(graphdef, p, rest), inp)
            return jnp.mean((out.astype(F32) - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    return step


def ours_train(model, inp: dict, target: np.ndarray):
    """(call(), stats): jitted donated train step; call() advances an internal state."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-5)
    params = jax.tree.map(jnp.copy, params)  # donated: keep the forward's params alive
    state = {"params": params, "opt": tx.init(params)}
    fn = jax.jit(mse_step(graphdef, rest, tx, apply_ours), donate_argnums=(0, 1))
    args = (jax.tree.map(jnp.asarray, inp), jnp.asarray(target))
    compiled, stats = compile_stats(fn, state["params"], state["opt"], *args)

    def call():
        state["params"], state["opt"], loss = compiled(state["params"], state["opt"], *args)
        return loss

    return call, stats


def torch_calls(model, inp: dict, target: np.ndarray, device: str, dtype=None):
    """(forward(), train_step()) closures for the diffusers model (eager)."""
    import torch

    tin = to_torch_inputs(inp, device, dtype)
    ttarget = to_torch_inputs({"y": target}, device, dtype)["y"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def forward():
        with torch.no_grad():
            return apply_torch(model, tin)

    def train():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(apply_torch(model, tin).float(), ttarget.float())
        loss.backward()
        opt.step()
        return loss

    return forward, train


# ----------------------------------------------------------------------------- FLOPs


def mmdit_flops(d: dict, batch: int, size: int, text_len: int) -> float:
    """Analytic forward FLOPs of SD3Transformer2DModel: 2 * (in * out) per token for every
    linear, 4 * L^2 * D per joint attention (QK^T and AV), over both token streams."""
    p, dim = d["patch_size"], d["num_attention_heads"] * d["attention_head_dim"]
    n_img, n_txt, layers = (size // p) ** 2, text_len, d["num_layers"]
    lin = lambda tokens, fan_in, fan_out: 2 * tokens * fan_in * fan_out
    stream = lambda tokens: (
        lin(tokens, dim, 3 * dim) + lin(tokens, dim, dim) + 2 * lin(tokens, dim, 4 * dim)
    )  # q/k/v, out projection, 4x-wide MLP (in and out)
    block = stream(n_img) + lin(1, dim, 6 * dim) + 4 * (n_img + n_txt) ** 2 * dim
    ctx_block = stream(n_txt) + lin(1, dim, 6 * dim)
    last_ctx = lin(n_txt, dim, 3 * dim) + lin(1, dim, 2 * dim)  # context_pre_only block
    total = layers * block + (layers - 1) * ctx_block + last_ctx
    c_in, c_out = d["in_channels"], d.get("out_channels") or d["in_channels"]
    total += lin(n_img, p * p * c_in, dim) + lin(n_txt, d["joint_attention_dim"], dim)
    total += lin(n_img, dim, p * p * c_out) + lin(1, dim, 2 * dim)  # proj_out, norm_out
    total += lin(1, 256, dim) + lin(1, dim, dim) + lin(1, d["pooled_projection_dim"], dim)
    total += lin(1, dim, dim)  # timestep and pooled-text MLPs
    return float(batch * total)


# ----------------------------------------------------------------------------- scaling child


def scaling_child(spec: dict) -> list[dict]:
    """MMDiT train step on a 1-device mesh, data=N and fsdp=N (same total batch)."""
    from diffusion import sharding
    from diffusion.models.mmdit import MMDiTConfig, SD3Transformer

    d, n = spec["arch"], jax.device_count()
    cfg = MMDiTConfig.from_diffusers(d)
    entry = type("E", (), {"text_len": spec["text_len"]})
    inp = make_inputs(d, entry, spec["batch"], spec["size"])
    target = np.zeros(inp["x"].shape, np.float32)
    tx = optax.adamw(1e-5)
    abstract = models.build_abstract(SD3Transformer, cfg)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    rng = np.random.default_rng(0)  # random weights without compiling an init program
    params = jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype), params)
    abstract_state = {"params": params, "opt": jax.eval_shape(tx.init, params), "rest": rest}

    rows = []
    for layout, shape, devices in (
        ("1 device", {"data": 1}, jax.devices()[:1]),
        (f"data={n}", {"data": n}, None),
        (f"fsdp={n}", {"fsdp": n}, None),
    ):
        mesh = sharding.make_mesh(shape, devices)
        shards = sharding.param_shardings(abstract_state, mesh)
        p = jax.device_put(params, shards["params"])
        opt = jax.jit(tx.init, out_shardings=shards["opt"])(p)
        state = {"params": p, "opt": opt, "rest": jax.device_put(rest, shards["rest"])}
        batch = sharding.make_global_batch({**inp, "target": target}, mesh)

        def step(s, b):
            body = mse_step(graphdef, s["rest"], tx, apply_ours)
            params, opt, loss = body(s["params"], s["opt"], b, b["target"])
            return {**s, "params": params, "opt": opt}, loss

        jitted = jax.jit(
            step,
            in_shardings=(shards, sharding.batch_sharding(mesh)),
            out_shardings=(shards, sharding.replicated(mesh)),
            donate_argnums=0,
        )
        with sharding.mesh_context(mesh):
            compiled, stats = compile_stats(jitted, state, batch)
        holder = {"s": state}

        def call(holder=holder, compiled=compiled, batch=batch):
            holder["s"], loss = compiled(holder["s"], batch)
            return loss

        sec = interleaved({"step": call}, spec["repeats"])["step"]
        per_dev = sharding.per_device_bytes(holder["s"]["params"])
        rows.append(
            {
                "layout": layout,
                "devices": len(mesh.devices.flat),
                "step_s": sec,
                "samples_s": spec["batch"] / sec,
                "compile_s": stats["compile_s"],
                "param_bytes_per_device": max(per_dev.values()),
            }
        )
    return rows


if __name__ == "__main__":  # the scaling subprocess: JSON spec in argv[1], JSON rows on stdout
    print("SCALING_JSON " + json.dumps(scaling_child(json.loads(sys.argv[1]))))
