"""End-to-end run of experiments/benchmark_throughput.py on configs/bench/cpu.py:runlocal.

No timing asserts: checks that the outputs exist, that ratios / FLOPs are positive and finite,
that our model matches diffusers with the copied weights, that XLA's MMDiT FLOP count agrees
with the analytic count, and that the GPU config degrades to a message without a GPU.
"""

import glob
import json
import math
import os

import pytest

from configs.bench import cpu, gpu
from experiments import benchmark_throughput as bench
from experiments import throughput_lib as lib

FLOP_RTOL = 0.15  # XLA also counts elementwise ops (norms, GELU, softmax) the analytic omits


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("throughput"))
    res = bench.main(cpu.get_config("runlocal"), workdir, command="test runlocal")
    return workdir, res


def _finite_positive(x):
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_outputs_written(run):
    workdir, res = run
    for name in ("report.md", "metrics.jsonl", "config.json"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    (path,) = glob.glob(os.path.join(workdir, "*.json").replace("*", "cpu-*"))
    with open(path) as f:
        saved = json.load(f)
    assert saved["env"]["jax"] and saved["env"]["torch"] and saved["env"]["diffusers"]
    assert len(saved["env"]["loadavg_start"]) == 3
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        sections = {json.loads(line)["section"] for line in f}
    assert sections == {"model", "ratio", "sampling", "scaling"}


def test_ratios_and_flops_positive(run):
    _, res = run
    models = {r["model"] for r in res["ratios"]}
    assert models == {"unet", "mmdit", "vae"}
    for r in res["ratios"]:
        assert _finite_positive(r["fwd_ratio"]) and _finite_positive(r["train_ratio"]), r
    for r in res["rows"]:
        if r["impl"] == "ours":
            for k in ("gflop_fwd", "gflop_train", "mfu_fwd", "mfu_train", "compile_train_s"):
                assert _finite_positive(r[k]), (k, r)
            assert r["gflop_train"] > 2 * r["gflop_fwd"], r  # backward costs ~2x forward


def test_same_weights_same_outputs(run):
    """The diffusers model holds our weights: outputs agree (fp32, CPU)."""
    _, res = run
    for key, info in res["models"].items():
        assert info["max_abs_diff"] <= 1e-3 * max(1.0, info["out_scale"]), (key, info)


def test_mmdit_flops_match_analytic(run):
    _, res = run
    (info,) = [v for k, v in res["models"].items() if k.startswith("mmdit")]
    rel = info["xla_fwd_flops"] / info["analytic_fwd_flops"] - 1
    assert abs(rel) < FLOP_RTOL, info


def test_sampling_overhead_and_scaling(run):
    _, res = run
    s = res["sampling"]
    assert math.isfinite(s["overhead"]) and _finite_positive(s["speedup"]), s
    assert s["nfe"] == s["overhead_steps"]  # Euler: one CFG-batched call per step
    layouts = [r["layout"] for r in res["scaling"]]
    assert layouts == ["1 device", "data=8", "fsdp=8"], res["scaling"]
    fsdp, single = res["scaling"][2], res["scaling"][0]
    assert fsdp["param_bytes_per_device"] < single["param_bytes_per_device"]  # actually sharded


def test_analytic_flops_independent_of_xla():
    """The analytic count is linear in batch and grows with the number of image tokens."""
    d = {
        "patch_size": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "num_layers": 2,
        "in_channels": 4,
        "joint_attention_dim": 8,
        "pooled_projection_dim": 8,
    }
    one = lib.mmdit_flops(d, 1, 8, 4)
    assert lib.mmdit_flops(d, 3, 8, 4) == pytest.approx(3 * one)
    assert lib.mmdit_flops(d, 1, 16, 4) > one


def test_gpu_config_without_gpu(tmp_path, capsys):
    cfg = gpu.get_config()
    assert cfg.require_gpu and "bf16" in cfg.variants
    assert bench.main(cfg, str(tmp_path)) is None
    assert bench.NO_GPU in capsys.readouterr().out
    with pytest.raises(ValueError, match="runlocal"):
        cpu.get_config("bogus")


def test_gpu_variants_run_on_cpu():
    """The GPU config's bf16 and remat variants (never run on a GPU here) build, compile and run
    on the CPU against diffusers in the same dtype; remat recomputes the forward, so XLA counts
    more train-step FLOPs than without it."""
    cfg = gpu.get_config("runlocal")
    cfg.variants, cfg.torch_threads, cfg.torch_compile = "fp32,bf16,bf16_remat", 1, False
    rows, _ = bench.bench_model(cfg, "mmdit", cfg.mmdit.sizes[0], {"fp32": 1e11, "bf16": 1e11})
    ours = {r["variant"]: r for r in rows if r["impl"] == "ours"}
    assert set(ours) == {"fp32", "bf16", "bf16_remat"}
    assert {r["variant"] for r in rows if r["impl"] == "diffusers"} == {"fp32", "bf16"}
    for r in bench.ratios(rows):
        assert r["vs"] == ("bf16" if r["variant"].startswith("bf16") else "fp32")
        assert _finite_positive(r["fwd_ratio"]) and _finite_positive(r["train_ratio"])
    assert ours["bf16_remat"]["gflop_train"] > 1.1 * ours["bf16"]["gflop_train"]
