"""Published claims checked from configs: one config per claim under configs/reproduce/.

    python -m experiments.reproduce --config configs/reproduce/<claim>.py --workdir W
    python -m experiments.reproduce --config configs/reproduce/quick.py --workdir W \\
        --config.export=benchmarks/results/reproduce

A claim trains the digits models it needs (each distinct training config once, cached under
<models_dir>/<name>-<hash of the config>/, default W/models, so reruns and other claims reuse
it), samples them through experiments/sweep_samplers.py and writes W/report.md (our numbers next
to the paper's, a plot, and one sentence: held here or not, and why), W/results.json,
W/metrics.jsonl and the plot. quick.py runs every claim into W/<claim>/ with one shared model
cache and writes a combined W/report.md; `export` copies the reports, plots and JSON there.
The claims live in reproduce_sampling.py (DDIM, DPM-Solver, EDM grids, guidance) and
reproduce_training.py (SD3 objectives, min-SNR, latent vs pixel).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

from absl import app, flags, logging
from ml_collections import config_flags

from configs import sweep_samplers as sweep_config
from diffusion import checkpoint, train
from diffusion.workdir import Workdir, as_json, markdown_table
from experiments import reproduce_sampling, reproduce_training, sweep_samplers

CLAIMS = {**reproduce_sampling.CLAIMS, **reproduce_training.CLAIMS}
SWEEP_KEYS = ("num_per_class", "bootstrap", "seed", "classifier", "judge")


class Context:
    """What a claim function uses: trained models (cached), sweeps, and its workdir."""

    def __init__(self, cfg, workdir: str, models_dir: str | None = None):
        self.cfg, self.wd = cfg, Workdir(workdir, cfg)
        self.models_dir = models_dir or cfg.get("models_dir") or os.path.join(workdir, "models")
        self.data_dir = cfg.get("data_dir") or ""
        self.trained = {}  # model workdir -> {"name", "steps", "train_s", "cached"}

    def file(self, name: str) -> str:
        return self.wd.file(name)

    def model(self, train_cfg) -> str:
        """The workdir of train_cfg's model, trained now unless the cache already holds it."""
        train_cfg = train_cfg.copy_and_resolve_references()
        train_cfg.data.data_dir = self.data_dir
        text = json.dumps(train_cfg.to_dict(), sort_keys=True, default=str)
        digest = hashlib.sha1(text.encode()).hexdigest()[:10]
        path = os.path.join(self.models_dir, f"{train_cfg.name}-{digest}")
        done = os.path.join(path, "trained.json")
        if os.path.exists(done):
            with open(done) as f:
                self.trained[path] = json.load(f) | {"cached": True}
            return path
        t0 = time.perf_counter()
        train.train(train_cfg, path)  # resumes a run that was interrupted
        record = {"name": train_cfg.name, "steps": train_cfg.total_steps,
                  "train_s": time.perf_counter() - t0}  # fmt: skip
        with open(done, "w") as f:
            json.dump(record, f)
        self.trained[path] = record | {"cached": False}
        return path

    def checkpoint_steps(self, workdir: str) -> list[int]:
        """The steps of a trained model's kept checkpoints (the min-SNR curve reads them all)."""
        with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
            return ckpt.all_steps()

    def sweep(self, name: str, checkpoint: str, **keys) -> dict:
        """experiments/sweep_samplers.sweep of checkpoint with the claim's evaluation settings and
        `keys` (configs/sweep_samplers.py keys), written to <workdir>/sweeps/<name>/."""
        c = sweep_config.get_config()
        c.reference = ""
        for k in SWEEP_KEYS:
            c[k] = self.cfg.eval[k]
        c.checkpoint, c.data_dir = checkpoint, self.data_dir
        for k, v in keys.items():
            c[k] = v
        return sweep_samplers.sweep(c, self.file(os.path.join("sweeps", name)))


def verdict(held, because: str, caveat: str = "") -> str:
    """The report's one sentence: held here or not (and why), or not run."""
    if held is None:
        return f"Not run: {because}."
    if held:
        return f"Held here: {because}."
    return f"Did not hold here: {because}" + (f"; a likely reason: {caveat}." if caveat else ".")


def _finished(cfg, workdir: str) -> dict | None:
    """The results.json of an earlier run of this very claim config in workdir (its config.json
    equal to cfg's), else None: a rerun of quick.py recomputes only the claims that changed."""
    conf, res = os.path.join(workdir, "config.json"), os.path.join(workdir, "results.json")
    if not (os.path.exists(conf) and os.path.exists(res)):
        return None
    with open(conf) as f:
        saved = json.load(f)
    if saved != as_json(cfg):
        return None
    with open(res) as f:
        return json.load(f)


def run_claim(cfg, workdir: str, models_dir: str | None = None) -> dict:
    """Runs one claim config into workdir; returns its result (also results.json)."""
    if cfg.claim not in CLAIMS:
        raise ValueError(f"unknown claim {cfg.claim!r}; valid: {sorted(CLAIMS)} or 'quick'")
    done = _finished(cfg, workdir)
    if done is not None:
        logging.warning("reproduce: %s already ran with this config in %s", cfg.claim, workdir)
        return done
    ctx = Context(cfg, workdir, models_dir)
    t0 = time.perf_counter()
    result = CLAIMS[cfg.claim](cfg, ctx)
    result["sentence"] = verdict(result["held"], result["because"], cfg.caveat)
    result["seconds"] = time.perf_counter() - t0
    result["models"] = [{"workdir": os.path.basename(k), **v} for k, v in ctx.trained.items()]
    for k in ("claim", "title", "paper", "held_means"):
        result[k] = cfg[k]
    ctx.wd.log(kind="claim", **{k: v for k, v in result.items() if k != "table"})
    with open(ctx.file("results.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    ctx.wd.write_report(claim_report(result) + "\n")
    return result


def claim_report(r: dict, heading: str = "#", image_dir: str = "") -> str:
    """A claim's report section: the paper, our table, the plot, the verdict, the cost."""
    models = "; ".join(
        f"{m['name']} ({m['steps']} steps, {m['train_s']:.0f} s"
        + (", cached)" if m["cached"] else ")") for m in r["models"]
    )  # fmt: skip
    plots = [f"![{p}]({os.path.join(image_dir, p)})" for p in r.get("plots", [])]
    return "\n\n".join([
        f"{heading} {r['title']}",
        f"**Paper.** {r['paper']}.",
        f"**Held means.** {r['held_means']}.",
        r["table"],
        *plots,
        f"**Verdict.** {r['sentence']}",
        f"Models: {models or 'none'}. Claim wall time {r['seconds']:.0f} s (training included "
        "when not cached).",
    ])  # fmt: skip


def run_quick(cfg, workdir: str) -> dict:
    """Every claim of cfg.claims into workdir/<claim>/ with one model cache; a combined report."""
    models_dir = cfg.models_dir or os.path.join(workdir, "models")
    wd, results = Workdir(workdir, cfg), {}
    for name in cfg.get("order") or list(cfg.claims):
        claim_cfg = cfg.claims[name]
        claim_cfg.data_dir = cfg.data_dir or claim_cfg.data_dir
        logging.warning("reproduce: claim %s", name)
        results[name] = run_claim(claim_cfg, os.path.join(workdir, name), models_dir)
    held = {True: "yes", False: "no", None: "not run"}
    rows = [{"claim": r["title"], "held": held[r["held"]], "seconds": r["seconds"],
             "verdict": r["sentence"]} for r in results.values()]  # fmt: skip
    total = sum(r["seconds"] for r in results.values())  # a reused claim: its own run's time
    first = cfg.claims[next(iter(results))]
    runlocal = any(cfg.claims[n].runlocal for n in results)
    text = "\n\n".join([
        f"# {cfg.title}",
        *(["**runlocal**: tiny models trained for 4 steps and a few samples; these numbers "
           "exercise the code and mean nothing."] if runlocal else []),
        "`python -m experiments.reproduce --config configs/reproduce/quick.py"
        f"{':runlocal' if runlocal else ''}` ({total / 60:.1f} minutes in all). Quality of "
        "digits samples is FD in digits-classifier features (not FID), improved precision / "
        f"recall and class accuracy of {10 * first.eval.num_per_class} samples; shapes samples "
        "are read by the shapes judge. Each section's numbers sit next to the paper's.",
        markdown_table(rows, ["claim", "held", "seconds", "verdict"], ".0f"),
        *[claim_report(r, "##", name) for name, r in results.items()],
    ])  # fmt: skip
    wd.write_report(text + "\n")
    with open(wd.file("results.json"), "w") as f:
        json.dump({"seconds": total, "claims": results}, f, indent=2, default=str)
    if cfg.get("export"):
        export(workdir, cfg.export, list(results))
    return {"seconds": total, "claims": results}


def export(workdir: str, dest: str, claims: list[str]) -> None:
    """Copy report.md / results.json and each claim's report, JSON, plots and compute curves (no
    models)."""
    for sub in ["", *claims]:
        os.makedirs(os.path.join(dest, sub), exist_ok=True)
        src = os.path.join(workdir, sub)
        for name in sorted(os.listdir(src)):
            keep = name.endswith(".png") or name.endswith("_curve.json")  # plots, curves
            if name in ("report.md", "results.json") or (sub and keep):
                shutil.copy(os.path.join(src, name), os.path.join(dest, sub, name))


def run(cfg, workdir: str) -> dict:
    if cfg.claim == "quick":
        return run_quick(cfg, workdir)
    return run_claim(cfg, workdir)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    run(flags.FLAGS.config, flags.FLAGS.workdir)
    print(open(os.path.join(flags.FLAGS.workdir, "report.md")).read())


if __name__ == "__main__":
    # Flags are defined only when run as a script, so experiments modules import together.
    config_flags.DEFINE_config_file("config", None, "configs/reproduce/<claim>.py[:variants]")
    flags.DEFINE_string("workdir", None, "output directory (trained models cached in W/models)")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
