"""Throughput on one GPU at published sizes: ours (JAX) vs diffusers (PyTorch), same weights.

    python -m experiments.benchmark_throughput --config configs/bench/gpu.py --workdir /tmp/tp

SD1.5 U-Net (860M) at 64x64 latents, SD3-medium MMDiT (2B) at 256 and 1024 image tokens
(32x32 and 64x64 latents; 333 text tokens as in SD3: 77 CLIP-L/G + 256 T5), SD VAE decoder at
512 px (64x64 latents); random PyTorch weights copied into ours. Ours in fp32, bf16 (fp32
master weights), bf16 + remat and bf16 with cuDNN flash attention; diffusers eager fp32 /
bf16 and torch.compile (fp32 forward, within a 10-minute budget). MFU against jnp matmul
peaks measured in the same run; peak device memory from `device.memory_stats()`.
Without a GPU it prints a message and exits.

Variant `runlocal`: one small model per family (a smoke run of the GPU code path).
"""

from configs import common
from configs.bench import cpu


def get_config(arg=None):
    v = common.parse(arg, flags=("runlocal",))
    c = cpu.get_config("runlocal" if v.runlocal else None)
    c.require_gpu = True
    c.variants = "fp32,bf16,bf16_remat,bf16_cudnn"
    c.torch_threads = 0
    c.torch_compile = True
    c.torch_compile_note = "attempted (fp32 forward)"
    c.torch_compile_budget_s = 600
    c.peak_n = 8192
    c.repeats = 10
    if v.runlocal:
        return c
    c.unet = dict(preset="sd15-unet", arch={}, batch=8, sizes=(64,), text_len=77)
    c.mmdit = dict(preset="sd3-medium", arch={}, batch=8, sizes=(32, 64), text_len=333)
    c.vae = dict(preset="sd-vae", arch={}, batch=4, sizes=(64,), text_len=0)
    c.sampling.size, c.sampling.repeats = 64, 5
    return c
