"""Peak memory of loading a single-file checkpoint: ours (`pipelines.load_single_file`, tensor
by tensor from the mmapped file) vs diffusers' `from_single_file`, on a synthetic file with the
published model's shapes (random values; no download).

    python -m experiments.benchmark_single_file --workdir /tmp/sf_bench [--arch sd1]
        [--file-dtype float16] [--no-reference]

Writes `<arch>.safetensors` (built-in configs' shapes, stored in --file-dtype) and a diffusers
config folder without weights (model_index.json, config.json files, the project's CLIP BPE
tokenizer, scheduler), then loads it into float32 parameters in a fresh subprocess per loader,
sampling /proc/self/status every 20 ms: RssAnon (the process's own memory: parameters, copies)
and RssFile (pages of the mmapped checkpoint: page cache the kernel can drop and re-read).
Reports peak RssAnon above the after-import baseline against the loaded parameters' bytes, the
peak RssFile, the file size and the load time, in report.md and metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

_FIELDS = ("VmRSS", "RssAnon", "RssFile")


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in _FIELDS:
                out[name] = int(value.split()[0]) * 1024
    return out


class Sampler:
    """Peak of each /proc/self/status field, sampled in a thread."""

    def __init__(self, interval=0.02):
        self.peak = _status()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval):
        while not self._stop.wait(interval):
            for k, v in _status().items():
                self.peak[k] = max(self.peak[k], v)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        for k, v in _status().items():
            self.peak[k] = max(self.peak[k], v)


def write_file(arch: str, path: str, file_dtype: str) -> int:
    """A random-valued single file with the built-in configs' shapes (streamed to disk)."""
    from flax import nnx

    from diffusion import models
    from diffusion.models import convert, ldm_keys
    from diffusion.models.presets import class_name
    from diffusion.pipelines import single_file_layout as layout
    from diffusion.pipelines.single_file_write import write_safetensors

    rng = np.random.default_rng(0)
    block = (rng.standard_normal(1 << 16) * 0.02).astype(file_dtype)
    items = []
    for comp in layout.ARCHITECTURES[arch].components:
        cls, config_cls = models.get_model(class_name(comp.preset))
        cfg = config_cls.from_diffusers(comp.preset)
        abstract = models.eval_shape(lambda cls=cls, cfg=cfg: cls(cfg, rngs=nnx.Rngs(0)))
        shapes = {k: s for k, (s, _) in convert.abstract_torch_state_dict(abstract).items()}
        groups = {}
        for key, entry in ldm_keys.key_map(comp.kind, shapes).items():
            groups.setdefault(comp.prefix + entry.key, []).append((entry, shapes[key]))
        for key, parts in groups.items():
            shape = ldm_keys.original_shape([e for e, _ in parts], [s for _, s in parts])
            n = int(np.prod(shape))
            produce = lambda n=n, shape=shape: np.resize(block, n).reshape(shape)  # noqa: E731
            items.append((key, shape, file_dtype, produce))
    return write_safetensors(path, items, metadata={"format": "pt"})


def write_config_folder(arch: str, folder: str) -> None:
    """A diffusers pipeline folder without weights: what `config=` needs."""
    from diffusion.data import tokenizer as tokenizers
    from diffusion.models.presets import class_name
    from diffusion.pipelines import single_file_layout as layout

    a = layout.ARCHITECTURES[arch]
    classes = {c.name: class_name(c.preset) for c in a.components}
    for name, _ in a.tokenizers:
        classes[name] = "CLIPTokenizer"
        shutil.copytree(tokenizers.BUILTIN["shapes"], os.path.join(folder, name))
    for c in a.components:
        os.makedirs(os.path.join(folder, c.name))
        with open(os.path.join(folder, c.name, "config.json"), "w") as f:
            json.dump(c.preset, f)
    os.makedirs(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(a.scheduler, f)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(layout.model_index(a.pipeline, classes, a.scheduler["_class_name"]), f)


def measure(loader: str, file: str, config: str) -> dict:
    """Load in this process (fresh: run via subprocess) and report memory peaks."""
    if loader == "ours":
        import jax
        from flax import nnx

        from diffusion import pipelines
        from diffusion.pipelines.loading import NETWORKS

        base = _status()
        start = time.perf_counter()
        with Sampler() as s:
            pipe = pipelines.load_single_file(file, config=config)
            leaves = [x for n in NETWORKS if getattr(pipe, n, None) is not None
                      for x in jax.tree.leaves(nnx.state(getattr(pipe, n), nnx.Param))]  # fmt: skip
            jax.block_until_ready(leaves)
        params = sum(x.nbytes for x in leaves if hasattr(x, "nbytes"))
    else:
        import diffusers
        import torch

        cls = getattr(diffusers, json.load(open(os.path.join(config, "model_index.json")))[
            "_class_name"])  # fmt: skip
        base = _status()
        start = time.perf_counter()
        with Sampler() as s:
            pipe = cls.from_single_file(file, config=config, local_files_only=True,
                                        torch_dtype=torch.float32)  # fmt: skip
        params = sum(p.numel() * p.element_size() for m in pipe.components.values()
                     if isinstance(m, torch.nn.Module) for p in m.parameters())  # fmt: skip
    seconds = time.perf_counter() - start
    return {"loader": loader, "seconds": seconds, "param_bytes": int(params),
            "baseline_anon": base["RssAnon"], "peak_anon": s.peak["RssAnon"],
            "peak_file": s.peak["RssFile"], "peak_rss": s.peak["VmRSS"],
            "peak_anon_over_params": (s.peak["RssAnon"] - base["RssAnon"]) / params}  # fmt: skip


def _report(rows, args, file_bytes) -> str:
    gib = 2**30
    lines = [f"# Single-file load memory ({args.arch}, file {args.file_dtype}, "
             f"{file_bytes / gib:.2f} GiB; float32 parameters)", "",
             f"`python -m experiments.benchmark_single_file --workdir {args.workdir} --arch "
             f"{args.arch} --file-dtype {args.file_dtype}`", "",
             "| loader | params GiB | peak RssAnon - baseline GiB | ratio | peak RssFile GiB "
             "| load s |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['loader']} | {r['param_bytes'] / gib:.2f} | "
            f"{(r['peak_anon'] - r['baseline_anon']) / gib:.2f} | "
            f"{r['peak_anon_over_params']:.3f} | {r['peak_file'] / gib:.2f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--arch", default="sd1", choices=["sd1", "sd2", "sdxl"])
    parser.add_argument("--file-dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--no-reference", action="store_true", help="skip diffusers")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print("RESULT " + json.dumps(measure(args.measure, args.file, args.config)), flush=True)
        return
    os.makedirs(args.workdir, exist_ok=True)
    file = os.path.join(args.workdir, f"{args.arch}.safetensors")
    config = os.path.join(args.workdir, f"{args.arch}-config")
    if not os.path.exists(file):
        write_file(args.arch, file, args.file_dtype)
    if not os.path.exists(config):
        write_config_folder(args.arch, config)
    rows = []
    for loader in ["ours"] + ([] if args.no_reference else ["diffusers"]):
        cmd = [sys.executable, "-m", "experiments.benchmark_single_file", "--workdir",
               args.workdir, "--measure", loader, "--file", file, "--config", config]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.split("RESULT ", 1)[1]))
        print(rows[-1], flush=True)
    report = _report(rows, args, os.path.getsize(file))
    print(report)
    with open(os.path.join(args.workdir, "report.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.workdir, "metrics.json"), "w") as f:
        json.dump({"arch": args.arch, "file_dtype": args.file_dtype,
                   "file_bytes": os.path.getsize(file), "rows": rows}, f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
