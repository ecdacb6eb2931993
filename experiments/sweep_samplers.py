"""Sampler sweep on a trained model: every method x NFE x grid x guidance scale -> sample quality
and time per sample (the analytic benchmark of experiments/benchmark_samplers.py, on a network).

    python -m experiments.sweep_samplers --config configs/sweep_samplers.py \\
        --config.checkpoint=/tmp/digits_eps --workdir /tmp/sweep_digits_eps

See configs/sweep_samplers.py for the options. For each setting the largest number of steps
whose exact NFE (samplers.nfe on the setting's grid) is at most the target is used; adaptive
methods (dpm_adaptive) run once per guidance scale and report the NFE they used. Quality comes
from experiments/sweep_sources.py (FD in digits-classifier features, precision / recall and
class accuracy for digits runs; the shapes judge's adherence and FD in judge features for shapes
text runs); with `reference` set, also the RMS distance of each sample to the reference
solver's sample from the same x_T (how far a solver is from the ODE solution it approximates).
Writes report.md, sweep.json, metrics.jsonl and quality_vs_nfe.png. Every input the sweep cannot
run (unknown method, option or grid, NFE below a method's order, guidance on an unconditional
model, a checkpoint of another model config) is an error before any sampling.
"""

from __future__ import annotations

import dataclasses
import inspect
import json

import matplotlib
import matplotlib.ticker
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from diffusion import samplers
from diffusion.workdir import Workdir, markdown_table
from experiments import sweep_sources
from experiments.benchmark_samplers import label, parse_methods, steps_for_nfe

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setting:
    """One sampler run: method with options, grid (None: the method's default), steps."""

    method: str
    options: tuple  # sorted (key, value) pairs
    grid: str | None
    num_steps: int
    nfe_target: int | None  # None: adaptive (the method picks its steps)

    @property
    def label(self) -> str:
        return label(self.method, dict(self.options))

    @property
    def program(self) -> tuple:
        """What the samples depend on (not the NFE target): a reference run of the same method
        and steps as a swept setting reuses its compiled program and samples."""
        return (self.method, self.options, self.grid, self.num_steps)


def min_nfe(name: str, kw: dict) -> int:
    """The fewest NFE at which the method is what its name says: its order (the `order` option
    or its default) for methods that have one, else 1."""
    m = samplers.get(name)
    if not m.orders:
        return 1
    default = inspect.signature(m.run).parameters.get("order")
    return int(kw.get("order", default.default if default is not None else 1))


def plan(cfg, schedule) -> list[Setting]:
    """Every (method, grid, NFE) of cfg, validated before any work: unknown methods, options and
    grids, and NFE targets below a method's order or unreachable raise ValueError."""
    methods = parse_methods(cfg.methods)  # unknown names list the valid ones
    if not methods:
        raise ValueError("no methods to sweep: set --config.methods (e.g. 'ddim,dpmpp_2m')")
    grids = [None if g in ("", "default") else g for g in cfg.grids] or [None]
    nfes = sorted(set(cfg.nfes))
    if any(not isinstance(n, int) or n < 1 for n in nfes):
        raise ValueError(f"nfes must be integers >= 1, got {tuple(cfg.nfes)}")
    out = []
    for name, kw in methods:
        m = samplers.get(name)
        for grid in grids:
            grid_name = grid or m.default_grid
            samplers.time_grid(schedule, grid_name, 2)  # unknown or inapplicable grid: error
            opts = tuple(sorted(kw.items()))
            try:  # unknown options / order: an error listing the valid ones
                samplers.nfe(name, 1, **kw)
            except ValueError as e:
                if not (m.adaptive and "adaptively" in str(e)):
                    raise
            if m.adaptive:
                out.append(Setting(name, opts, grid, 1, None))
                continue
            fn = lambda n, g=grid_name: samplers.time_grid(schedule, g, n)  # noqa: E731
            low = min_nfe(name, kw)
            for target in nfes:
                steps = steps_for_nfe(name, kw, target, fn) if target >= low else None
                if steps is None:
                    raise ValueError(
                        f"{label(name, kw)} needs NFE >= {max(low, samplers.nfe(name, 1, **kw))}"
                        f"; the sweep asks for {target} (nfes={tuple(nfes)})"
                    )
                out.append(Setting(name, opts, grid, steps, target))
    seen = {}  # targets that round to the same steps run once (the first target is kept)
    for s in out:
        seen.setdefault((s.method, s.options, s.grid, s.num_steps), s)
    return list(seen.values())


def check_guidance(scales, kind: str) -> list[float]:
    scales = [float(g) for g in scales] or [1.0]
    if any(g < 0 for g in scales):
        raise ValueError(f"guidance scales must be >= 0, got {scales}")
    if kind == "none" and any(g != 1.0 for g in scales):
        raise ValueError(f"an unconditional model has no guidance; got guidance_scales={scales}")
    return scales


def parse_reference(spec: str) -> Setting | None:
    """'method[:opt=v]@steps' (e.g. 'rk4@100') -> a Setting; '' -> None."""
    if not spec:
        return None
    method, _, steps = spec.rpartition("@")
    if not method or not steps.isdigit():
        raise ValueError(f"reference must be 'method[:option=value]@steps', got {spec!r}")
    (name, kw), *rest = parse_methods(method)
    if rest or samplers.get(name).stochastic or samplers.get(name).adaptive:
        raise ValueError(f"reference must be one deterministic fixed-step method, got {spec!r}")
    samplers.nfe(name, int(steps), **kw)
    return Setting(name, tuple(sorted(kw.items())), None, int(steps), None)


def load_config_file(spec: str):
    """get_config(variants) of a config file given as 'path.py[:variants]'."""
    import importlib.util

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_train_config", path)
    if module_spec is None or not path.endswith(".py"):
        raise FileNotFoundError(f"train_config {spec!r}: expected 'configs/<name>.py[:variants]'")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _prepare(cfg):
    """(source, scorer, settings, guidance scales, reference) with every check done."""
    if not cfg.checkpoint:
        raise ValueError("set --config.checkpoint=DIR (a training workdir or a pipeline folder)")
    run_cfg = load_config_file(cfg.train_config) if cfg.get("train_config") else None
    step = None if cfg.step < 0 else cfg.step
    source = sweep_sources.source_for(
        cfg.checkpoint, run_cfg, step, num_per_class=cfg.num_per_class,
        num_per_prompt=cfg.num_per_prompt, num_prompts=cfg.num_prompts,
        data_dir=cfg.data_dir or None,
        image_size=cfg.image_size, dataset=cfg.dataset, std=cfg.exact_std,
        schedule=cfg.exact_schedule,
    )  # fmt: skip
    settings = plan(cfg, source.schedule)
    scales = check_guidance(cfg.guidance_scales, source.kind)
    reference = parse_reference(cfg.reference)
    scorer = sweep_sources.scorer_for(source, classifier=cfg.classifier, judge=cfg.judge,
                                      bootstrap=cfg.bootstrap)  # fmt: skip
    if getattr(source, "shape", None) is not None and source.cfg.get("latents") is None:
        scorer.check(source.shape)
    return source.load(), scorer, settings, scales, reference


# Samples already drawn in this process: (checkpoint, step, setting, guidance, seed, sizes) ->
# generate()'s output. Reproductions share reference solutions and settings across claims.
_SAMPLES: dict = {}


def generate(source, s: Setting, scale: float, seed: int, cache: bool = True):
    """source.generate(s, scale, seed), remembered for the process when cache is set."""
    import os

    n = (getattr(source, "num_per_class", None), source.num_per_prompt, source.num_prompts)
    key = (os.path.realpath(source.workdir), source.step, s.program, scale, seed, n, source.kind)
    if not cache:
        return source.generate(s, scale, seed)
    if key not in _SAMPLES:
        _SAMPLES[key] = source.generate(s, scale, seed)
    return _SAMPLES[key]


def _conditions(source):
    return source.prompts if source.kind == "text" else source.labels


def _rms(x, ref):
    return None if ref is None else float(np.sqrt(np.mean((x - ref) ** 2)))


def sweep(cfg, workdir: str | None = None) -> dict:
    """Runs the sweep described in the module docstring; returns {"rows", "baseline", ...}."""
    source, scorer, settings, scales, reference = _prepare(cfg)
    wd = Workdir(workdir, cfg) if workdir else None
    rows, refs = [], {}
    for g in scales:
        if reference is not None:
            refs[g] = generate(source, reference, g, cfg.seed, cfg.cache)[0]
        for s in settings:
            x, nfe, compile_s, run_s = generate(source, s, g, cfg.seed, cfg.cache)
            per = x.shape[0] * (x.shape[1] if x.ndim == 5 else 1)  # (P, N, ...) for text runs
            row = {"method": s.label, "grid": s.grid or samplers.get(s.method).default_grid,
                   "guidance": g, "num_steps": s.num_steps, "nfe_target": s.nfe_target,
                   "nfe": nfe, "stochastic": samplers.get(s.method).stochastic,
                   **scorer.score(x, _conditions(source)),
                   "rms_to_reference": _rms(x, refs.get(g)), "compile_s": compile_s,
                   "ms_per_sample": 1e3 * run_s / per}  # fmt: skip
            rows.append(row)
            if wd:
                wd.log(kind="sweep", **row)
            logging.info("%s", row)
    n = len(source.labels) if source.kind != "text" else len(source.prompts) * cfg.num_per_prompt
    summary = {
        "checkpoint": cfg.checkpoint,
        "step": None if source.step is None else int(source.step),
        "feature_space": scorer.feature_space,
        "num_samples": n,
        "reference": None if reference is None else cfg.reference,
        "baseline": scorer.baseline(n),
        "rows": rows,
    }
    if wd:
        write_outputs(wd, summary)
    return summary


def quality_columns(rows) -> list[str]:
    keys = ["fd", "fd_std", "precision", "recall", "accuracy", "adherence", "rms_to_reference"]
    return [k for k in keys if any(r.get(k) is not None for r in rows)]


def write_outputs(wd: Workdir, s: dict) -> str:
    """report.md, sweep.json and quality_vs_nfe.png in the workdir; returns the report text."""
    cols = ["method", "grid", "guidance", "nfe", "num_steps", *quality_columns(s["rows"])]
    cols += ["ms_per_sample", "compile_s"]
    base = s["baseline"]
    text = "\n\n".join([
        f"# Sampler sweep: {s['checkpoint']} (step {s['step']})",
        f"{s['num_samples']} samples per setting, all from the same x_T. FD is the Frechet "
        f"distance in {s['feature_space']} (not FID); baseline ({base['source']}): "
        + ", ".join(f"{k} {v:.4g}" for k, v in base.items() if isinstance(v, float))
        + (f". rms_to_reference: RMS distance to {s['reference']} from the same x_T."
           if s["reference"] else "."),
        markdown_table(s["rows"], cols, ".4g"),
    ])  # fmt: skip
    wd.write_report(text + "\n")
    with open(wd.file("sweep.json"), "w") as f:
        json.dump(s, f, indent=2)
    plot_quality(s["rows"], wd.file("quality_vs_nfe.png"), s["feature_space"])
    return text


def plot_quality(rows, path, feature_space="features", *, x="nfe",
                 group=("method", "grid", "guidance"), keys=None, title=None):  # fmt: skip
    """One panel per quality metric (default: those the rows have) against `x`, a line per
    distinct `group` of row values."""
    keys = keys or [k for k in quality_columns(rows) if k != "fd_std"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    lines = dict.fromkeys(tuple(r[g] for g in group) for r in rows)
    for ax, key in zip(axes[0], keys):
        for i, line in enumerate(lines):
            pts = sorted((r[x], r[key]) for r in rows if tuple(r[g] for g in group) == line
                         and r.get(key) is not None)  # fmt: skip
            if pts:
                name = " ".join(f"g={v:g}" if k == "guidance" else str(v)
                                for k, v in zip(group, line))  # fmt: skip
                ax.plot(*zip(*pts), "-" if i < 10 else "--", marker="o", ms=3, label=name)
        ax.set(xlabel=x, ylabel=f"FD ({feature_space})" if key == "fd" else key)
        values = [r[key] for r in rows if r.get(key)]
        if x in ("nfe", "num_steps", "train_step", "train_flops"):
            ax.set_xscale("log")
            if x != "train_flops":
                ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        if key in ("fd", "rms_to_reference") and values and max(values) > 20 * min(values):
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=1 + len(lines) // 12)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    s = sweep(flags.FLAGS.config, flags.FLAGS.workdir)
    print(open(f"{flags.FLAGS.workdir}/report.md").read() if s else "")


if __name__ == "__main__":
    # Flags are defined only when run as a script, so experiments modules import together.
    config_flags.DEFINE_config_file("config", None, "configs/sweep_samplers.py[:variants]")
    flags.DEFINE_string("workdir", None, "output directory")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
