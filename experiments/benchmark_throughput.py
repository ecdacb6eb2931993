"""Throughput of our models vs diffusers (PyTorch) with the same config and the same weights.

    python -m experiments.benchmark_throughput --config configs/bench/cpu.py --workdir DIR

See configs/bench/cpu.py for what it measures and writes (configs/bench/gpu.py: full sizes).
Sections: per-model forward / train-step throughput, FLOPs, MFU, compile time and memory; a
whole 28-step CFG flow-Euler sampling run (one compiled program vs a diffusers-style Python loop)
and the compiled loop's overhead over NFE x forward; the sharded MMDiT train step on 8 fake CPU
devices (a subprocess). Ours runs first in each interleaved round; ratios are ours / diffusers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from diffusion import samplers, schedules
from diffusion.samplers import guidance
from diffusion.workdir import Workdir, markdown_table
from experiments import throughput_lib as lib
from experiments.throughput_report import write_outputs

NO_GPU = "no GPU present: run configs/bench/gpu.py on a GPU host"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f} s] {msg}", flush=True)


def environment(command: str) -> dict:
    import diffusers
    import torch

    return {
        "command": command,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def try_torch_compile(fn, budget_s: float):
    """torch.compile(fn) and one call under a SIGALRM budget; (compiled or None, note)."""
    import signal

    import torch

    def timeout(*_):
        raise TimeoutError(f"torch.compile over the {budget_s:.0f} s budget")

    t0, old = time.perf_counter(), signal.signal(signal.SIGALRM, timeout)
    signal.alarm(int(budget_s))
    try:
        compiled = torch.compile(fn)
        lib.now_sync(compiled())
        return compiled, f"compiled in {time.perf_counter() - t0:.0f} s"
    except Exception as e:  # noqa: BLE001 - recorded in the report, never fatal
        return None, f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def bench_model(cfg, key: str, size: int, peaks: dict) -> tuple[list[dict], dict]:
    """Rows for one (model, latent size): ours per variant and diffusers eager (+compiled)."""
    import torch

    entry, dev = cfg[key], torch_device()
    d = lib.arch_dict(entry)
    variants = [lib.Variant.parse(v) for v in cfg.variants.split(",")]
    base, tmodel = lib.build_pair(d, dev)
    inp = lib.make_inputs(d, entry, entry.batch, size)
    fwd, train, stats = {}, {}, {}
    fwd[("ours", "fp32")], stats[("ours", "fp32", "fwd")] = lib.ours_forward(base, inp)
    out = np.asarray(fwd[("ours", "fp32")]())
    target = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
    ref = lib.torch_calls(tmodel, inp, target, dev)[0]().float().cpu().numpy()
    ref = ref.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    info = {"max_abs_diff": float(np.abs(out - ref).max()), "out_scale": float(np.abs(ref).max())}
    log(f"{key}@{size}: built ours and diffusers, max |diff| {info['max_abs_diff']:.2e}")
    for v in variants:
        m = base if v.name == "fp32" else lib.build_ours(d, v, base=base)
        if ("ours", v.name) not in fwd:
            fwd[("ours", v.name)], stats[("ours", v.name, "fwd")] = lib.ours_forward(m, inp)
        train[("ours", v.name)], stats[("ours", v.name, "train")] = lib.ours_train(m, inp, target)
    for tname in dict.fromkeys("bf16" if v.dtype == jnp.bfloat16 else "fp32" for v in variants):
        tm = tmodel if tname == "fp32" else lib.build_torch(d, base, dev).to(torch.bfloat16)
        dtype = torch.bfloat16 if tname == "bf16" else None
        fwd[("diffusers", tname)], train[("diffusers", tname)] = lib.torch_calls(
            tm, inp, target, dev, dtype
        )
    info["torch_compile"] = cfg.torch_compile_note
    if cfg.torch_compile:
        compiled, info["torch_compile"] = try_torch_compile(
            fwd[("diffusers", "fp32")], cfg.torch_compile_budget_s
        )
        if compiled is not None:
            fwd[("diffusers", "fp32+compile")] = compiled
    log(f"{key}@{size}: compiled ours")
    fwd_s = lib.interleaved(fwd, cfg.repeats)
    train_s = lib.interleaved(train, cfg.repeats)
    rows = []
    for impl, var in fwd:
        row = {"model": key, "size": size, "batch": entry.batch, "impl": impl, "variant": var}
        row["fwd_samples_s"] = entry.batch / fwd_s[(impl, var)]
        if (impl, var) in train_s:
            row["train_samples_s"] = entry.batch / train_s[(impl, var)]
        if impl == "ours":
            row.update(ours_stats(stats, var, fwd_s, train_s, peaks))
        rows.append(row)
    if jax.default_backend() == "gpu":
        info["peak_bytes_in_use"] = jax.devices()[0].memory_stats().get("peak_bytes_in_use")
    if key == "mmdit":
        info["analytic_fwd_flops"] = lib.mmdit_flops(d, entry.batch, size, entry.text_len)
        info["xla_fwd_flops"] = stats[("ours", variants[0].name, "fwd")]["flops"]
        info["xla_train_flops"] = stats[("ours", variants[0].name, "train")]["flops"]
    return rows, info


def ours_stats(stats, var, fwd_s, train_s, peaks) -> dict:
    f, t = stats[("ours", var, "fwd")], stats[("ours", var, "train")]
    peak = peaks["bf16" if var.startswith("bf16") else "fp32"]
    return {
        "compile_fwd_s": f["lower_s"] + f["compile_s"],
        "compile_train_s": t["lower_s"] + t["compile_s"],
        "gflop_fwd": f["flops"] / 1e9,
        "gflop_train": t["flops"] / 1e9,
        "mfu_fwd": f["flops"] / fwd_s[("ours", var)] / peak,
        "mfu_train": t["flops"] / train_s[("ours", var)] / peak,
        "temp_mib_fwd": f["temp_bytes"] / 2**20,
        "temp_mib_train": t["temp_bytes"] / 2**20,
        "arg_mib_train": t["arg_bytes"] / 2**20,
    }


def _diffusers_loop(tmodel, x_T, cond, uncond, steps, scale, shift):
    """The diffusers pipeline's denoising loop: FlowMatchEulerDiscreteScheduler + CFG."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    ctx, pooled = (torch.cat([u, c]) for u, c in zip(uncond, cond))
    x = x_T
    with torch.no_grad():
        for t in sched.timesteps:
            v = tmodel(
                hidden_states=torch.cat([x, x]),
                encoder_hidden_states=ctx,
                pooled_projections=pooled,
                timestep=t.expand(2 * x.shape[0]),
            ).sample
            v_u, v_c = v.chunk(2)
            x = sched.step(v_u + scale * (v_c - v_u), t, x).prev_sample
    return x


def bench_sampling(cfg) -> dict:
    """28-step CFG flow Euler: one compiled program (ours) vs a Python loop (diffusers), and
    our loop's overhead over NFE x one compiled forward at `overhead_steps`."""
    s, entry, dev = cfg.sampling, cfg.mmdit, torch_device()
    d = lib.arch_dict(entry)
    base, tmodel = lib.build_pair(d, dev)
    variant = lib.Variant.parse(s.variant)
    model = base if variant.name == "fp32" else lib.build_ours(d, variant, base)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    schedule = schedules.get("rectified_flow", shift=s.shift)
    c_in = lib.make_inputs(d, entry, s.batch, s.size, seed=2)
    u_in = lib.make_inputs(d, entry, s.batch, s.size, seed=3)
    cond, uncond = ({"ctx": i["ctx"], "pooled": i["pooled"]} for i in (c_in, u_in))
    x_T = np.asarray(samplers.prior(schedule, jax.random.key(0), c_in["x"].shape))

    def run(params, x, cond, uncond, steps):
        net = nnx.merge(graphdef, params, rest)
        model_fn = lambda x, mt, c: net(x, c["ctx"], c["pooled"], mt)
        denoise = guidance.cfg_denoiser(model_fn, schedule, "velocity", cond, uncond, s.scale)
        return samplers.sample(denoise, x, schedule, method="euler", num_steps=steps)

    progs, out = {}, {"batch": s.batch, "size": s.size, "scale": s.scale}
    for steps in (s.steps, s.overhead_steps):
        fn = jax.jit(lambda p, x, c, u, n=steps: run(p, x, c, u, n))
        args = (params, jnp.asarray(x_T), cond, uncond)
        compiled, st = lib.compile_stats(fn, *args)
        progs[steps] = lambda compiled=compiled, args=args: compiled(*args)
        out[f"compile_s_{steps}"] = st["lower_s"] + st["compile_s"]
    log("sampling: compiled")
    fwd_inp = lib.make_inputs(d, entry, 2 * s.batch, s.size, seed=4)
    forward, _ = lib.ours_forward(model, fwd_inp)
    tx = lib.to_torch_inputs({"x": x_T}, dev)["x"]
    tc, tu = ([lib.to_torch_inputs(c, dev)[k] for k in ("ctx", "pooled")] for c in (cond, uncond))
    loop = lambda: _diffusers_loop(tmodel, tx, tc, tu, s.steps, s.scale, s.shift)
    t = lib.interleaved({"ours": progs[s.steps], "diffusers": loop}, s.repeats)
    t_long = lib.interleaved({"loop": progs[s.overhead_steps], "fwd": forward}, s.repeats)
    nfe = samplers.nfe("euler", s.overhead_steps)
    out.update(
        steps=s.steps,
        ours_s=t["ours"],
        diffusers_s=t["diffusers"],
        speedup=t["diffusers"] / t["ours"],
        overhead_steps=s.overhead_steps,
        nfe=nfe,
        loop_s=t_long["loop"],
        forward_s=t_long["fwd"],
        overhead=t_long["loop"] / (nfe * t_long["fwd"]) - 1,
    )
    return out


def bench_scaling(cfg) -> list[dict] | str:
    """The sharded MMDiT train step in a subprocess with 8 fake CPU devices."""
    sc = cfg.scaling
    spec = {
        "arch": lib.arch_dict(sc),
        "batch": sc.batch,
        "size": sc.size,
        "text_len": sc.text_len,
        "repeats": sc.repeats,
    }
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={sc.devices}",
    }
    cmd = [sys.executable, "-m", "experiments.throughput_lib", json.dumps(spec)]
    try:
        res = subprocess.run(
            cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=sc.timeout_s
        )
    except subprocess.TimeoutExpired:
        return f"scaling subprocess over {sc.timeout_s} s"
    for line in res.stdout.splitlines():
        if line.startswith("SCALING_JSON "):
            return json.loads(line[len("SCALING_JSON ") :])
    return f"scaling subprocess failed (rc {res.returncode}): {res.stderr[-1500:]}"


def ratios(rows: list[dict]) -> list[dict]:
    """ours / diffusers samples/s for each ours row against diffusers eager of the same dtype."""
    ref = {(r["model"], r["size"], r["variant"]): r for r in rows if r["impl"] == "diffusers"}
    out = []
    for r in rows:
        if r["impl"] != "ours":
            continue
        dtype = "bf16" if r["variant"].startswith("bf16") else "fp32"
        t = ref[(r["model"], r["size"], dtype)]
        row = {
            "model": r["model"],
            "size": r["size"],
            "variant": r["variant"],
            "vs": t["variant"],
            "fwd_ratio": r["fwd_samples_s"] / t["fwd_samples_s"],
            "train_ratio": r["train_samples_s"] / t["train_samples_s"],
        }
        compiled = ref.get((r["model"], r["size"], f"{dtype}+compile"))
        if compiled is not None:  # torch.compile'd diffusers forward (inductor)
            row["fwd_ratio_vs_compile"] = r["fwd_samples_s"] / compiled["fwd_samples_s"]
        out.append(row)
    return out


def main(cfg, workdir: str, command: str | None = None) -> dict | None:
    """Run every section of cfg, write the outputs; None (with a message) on a GPU config
    without a GPU. Restores torch's thread count afterwards (it is process-global)."""
    if cfg.require_gpu and jax.default_backend() != "gpu":
        print(NO_GPU)
        return None
    import torch

    threads = torch.get_num_threads()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    try:
        res = run_all(cfg, Workdir(workdir, cfg), command or " ".join(sys.argv))
    finally:
        torch.set_num_threads(threads)
    return res


def run_all(cfg, wd: Workdir, command: str) -> dict:
    res = {"env": environment(command)}
    reps = cfg.repeats
    res["peaks"] = {"fp32": lib.matmul_peak(cfg.peak_n, jnp.float32, reps)}
    if "bf16" in cfg.variants:
        res["peaks"]["bf16"] = lib.matmul_peak(cfg.peak_n, jnp.bfloat16, reps)
    res["rows"], res["models"] = [], {}
    for key in cfg.models.split(","):
        for size in cfg[key].sizes:
            rows, info = bench_model(cfg, key, size, res["peaks"])
            res["rows"] += rows
            res["models"][f"{key}@{size}"] = info
            for r in rows:
                wd.log(section="model", **r)
            cols = ["model", "size", "impl", "variant", "fwd_samples_s", "train_samples_s"]
            print(markdown_table(rows, cols), flush=True)
    res["ratios"] = ratios(res["rows"])
    log("models done")
    res["sampling"] = bench_sampling(cfg) if cfg.sampling.enabled else "disabled"
    log("sampling done")
    res["scaling"] = bench_scaling(cfg) if cfg.scaling.enabled else "disabled"
    res["env"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write_outputs(wd, cfg, res)
    return res


def _main(argv):
    del argv
    main(
        flags.FLAGS.config,
        flags.FLAGS.workdir,
        command=" ".join(["python -m experiments.benchmark_throughput", *sys.argv[1:]]),
    )


if __name__ == "__main__":
    # Flags are defined only when run as a script, so experiments modules import together.
    config_flags.DEFINE_config_file("config", None, "configs/bench/*.py[:variants]")
    flags.DEFINE_string("workdir", None, "output directory")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(_main)
