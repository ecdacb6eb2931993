"""Throughput on a CPU: ours (JAX, jit) vs diffusers (PyTorch eager), same configs and weights.

    python -m experiments.benchmark_throughput --config configs/bench/cpu.py --workdir /tmp/tp

Small SD-shaped models (SD1.5-like U-Net, SD3-medium-like MMDiT, SD VAE decoder; narrow widths
so the whole run takes ~5 minutes on 2 cores): forward and train-step (fwd + bwd + AdamW)
samples/s, XLA FLOPs, MFU against a matmul measured in the same run, compile seconds and XLA
memory; 28-step CFG flow-Euler sampling (one compiled program vs the diffusers Python loop) and
the loop overhead at 50 steps; the sharded MMDiT train step on 8 fake CPU devices. Writes
report.md, metrics.jsonl and benchmarks/results/<device>-<date>.json. fp32 only on a CPU.

Variant `runlocal`: tiny sizes, few repeats, results JSON in the workdir (tests, ~1 minute).
"""

import ml_collections

from configs import common

# torch.compile (inductor, forward only) on this 2-core machine: a 2-layer 64-wide MLP compiled in
# 11 s when idle and 204 s at load ~13, so it is on here with a per-model budget; a model over
# the budget is reported as such and compared eagerly only.
TORCH_COMPILE_NOTE = "torch.compile disabled in this config"


def _unet(runlocal):
    ch = [32, 64, 128, 128]
    arch = dict(block_out_channels=ch, cross_attention_dim=ch[-1], attention_head_dim=8)
    if runlocal:  # two levels (one cross-attention, one plain), as in SD1.5's first and last
        arch = dict(
            block_out_channels=[32, 32],
            cross_attention_dim=32,
            layers_per_block=1,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            attention_head_dim=8,
        )
    return dict(
        preset="sd15-unet",
        arch=arch,
        batch=1 if runlocal else 2,
        sizes=(16,),
        text_len=8 if runlocal else 16,
    )


def _mmdit(runlocal, layers=4):
    heads, head_dim = (2, 32) if runlocal else (4, 32)
    arch = dict(
        num_layers=min(2, layers) if runlocal else layers,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        caption_projection_dim=heads * head_dim,
        joint_attention_dim=64 if runlocal else 256,
        pooled_projection_dim=64,
        sample_size=32,
        pos_embed_max_size=64,
    )
    return dict(
        preset="sd3-medium",
        arch=arch,
        batch=1 if runlocal else 2,
        sizes=(16,) if runlocal else (32,),
        text_len=8 if runlocal else 32,
    )


def _vae(runlocal):
    arch = dict(block_out_channels=[32, 32, 64, 64])
    if runlocal:
        arch = dict(
            block_out_channels=[32, 32],
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            layers_per_block=1,
        )
    return dict(preset="sd-vae", arch=arch, batch=1, sizes=(8,) if runlocal else (16,), text_len=0)


def get_config(arg=None):
    v = common.parse(arg, flags=("runlocal",))
    runlocal = v.runlocal
    c = ml_collections.ConfigDict()
    c.require_gpu = False
    c.variants = "fp32"  # ours: comma list of fp32 / bf16 [_remat] [_xla / _cudnn]
    # torch intra-op threads (0: torch's default, one per core, like XLA's CPU thread pool). On a
    # loaded machine 1 thread can be faster (measured under load ~15: U-Net forward 0.5-1.2 s with 1
    # thread, 5.7-10.8 s with 2, OpenMP threads spinning on busy cores), but it halves torch's share
    # of an idle machine, so the comparison uses the default.
    c.torch_threads = 1 if runlocal else 0  # runlocal runs in the test suite beside another worker
    c.torch_compile = not runlocal  # forward only; see the note above
    c.torch_compile_note = TORCH_COMPILE_NOTE
    c.torch_compile_budget_s = 300
    c.repeats = 2 if runlocal else 5
    c.peak_n = 256 if runlocal else 1024
    c.models = "unet,mmdit,vae"
    c.unet, c.mmdit, c.vae = _unet(runlocal), _mmdit(runlocal), _vae(runlocal)
    c.sampling = dict(
        enabled=True,
        variant="fp32",
        batch=1,
        size=c.mmdit.sizes[0],
        scale=5.0,
        shift=3.0,
        steps=4 if runlocal else 28,
        overhead_steps=6 if runlocal else 50,
        repeats=2 if runlocal else 3,
    )
    c.scaling = dict(
        enabled=True,
        devices=8,
        batch=8,
        size=8 if runlocal else 16,
        text_len=8,
        repeats=2 if runlocal else 3,
        timeout_s=300,
        preset="sd3-medium",
        arch=_mmdit(runlocal, layers=1 if runlocal else 2)["arch"],
    )
    c.results_dir = "" if runlocal else "benchmarks/results"
    return c
