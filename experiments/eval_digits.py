"""Class accuracy of a class-conditional digits model (configs/digits_unet_eps.py or _flow.py).

    python -m experiments.eval_digits --workdir /tmp/digits_eps [--num_per_class 50]

Restores the EMA parameters of the run's latest checkpoint, draws num_per_class samples per
digit with the run's sampler and guidance scale (config.json's `sample` section), and classifies
them with an RBF support-vector classifier fitted to the REAL digits train split at the same
resolution (its accuracy on the real test split shows how well it reads real digits; guided
samples are more prototypical than real ones and can score higher). The
sample accuracy is the fraction of samples classified as the label they were conditioned on.
Writes eval_digits.json, eval_digits.png (one row per class) and a line in metrics.jsonl to the
workdir, and prints a per-class table. --guidance_scale overrides the run's scale (1.0: the
conditional model without guidance); the files are then named eval_digits_g<scale>.*.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from diffusion import data, images, tasks
from diffusion.train_state import restore_ema
from diffusion.workdir import Workdir, markdown_table, read_config


def real_digits(name: str, split: str, data_dir=None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H*W*C) in [-1, 1] as in training, labels (N,)) of a digits split."""
    source = data.load_source(name, split, data_dir)
    examples = [source[i] for i in range(len(source))]
    x = np.stack([data.preprocess_image(np.asarray(e["image"])) for e in examples])
    return x.reshape(len(x), -1), np.asarray([int(e["label"]) for e in examples])


def fit_classifier(name: str, data_dir=None):
    """RBF SVM on real train pixels; returns (classifier, accuracy on the real test split)."""
    from sklearn.svm import SVC

    x_train, y_train = real_digits(name, "train", data_dir)
    x_test, y_test = real_digits(name, "test", data_dir)
    clf = SVC(C=10.0, gamma="scale").fit(x_train, y_train)
    return clf, float(np.mean(clf.predict(x_test) == y_test))


def sample_classes(task, model, shape, seed: int, guidance_scale=None) -> np.ndarray:
    """(num_classes, *shape) samples in [-1, 1] (shape = (num_per_class, H, W, C)), one compiled
    call per class, with the run's sampler and guidance scale (or the given one)."""
    sc = task.sampling
    scale = sc.guidance_scale if guidance_scale is None else guidance_scale
    num_per_class = shape[0]
    graphdef, params = nnx.split(model)

    @jax.jit
    def fn(params, label, rng):
        cond = {"class_labels": jnp.full((num_per_class,), label, jnp.int32)}
        return task.sample(
            nnx.merge(graphdef, params),
            rng,
            cond,
            shape,
            method=sc.method,
            num_steps=sc.num_steps,
            guidance_scale=scale,
        )

    key = jax.random.key(seed)
    num_classes = task.conditioning.num_classes
    out = [fn(params, c, jax.random.fold_in(key, c)) for c in range(num_classes)]
    return np.clip(np.stack([np.asarray(o) for o in out]), -1.0, 1.0)


def evaluate(
    workdir: str, num_per_class: int = 50, seed: int = 0, data_dir=None, guidance_scale=None
) -> dict:
    """Runs the evaluation described in the module docstring; returns the JSON record.
    guidance_scale overrides the run's (1.0: the conditional model without guidance)."""
    cfg = read_config(workdir)
    kind = (cfg.get("conditioning") or {}).get("name")
    if cfg.task != "diffusion" or kind != "class" or not cfg.data.name.startswith("digits"):
        raise ValueError(
            f"{workdir} is not a class-conditional digits run "
            f"(conditioning={kind!r}, data={cfg.data.name!r})"
        )
    task = tasks.from_config(cfg)
    data_dir = data_dir or cfg.data.get("data_dir")
    clf, real_acc = fit_classifier(cfg.data.name, data_dir)
    model, step = restore_ema(cfg, task, workdir)
    stem = "eval_digits" if guidance_scale is None else f"eval_digits_g{guidance_scale:g}"
    m = cfg.model.config
    shape = (num_per_class, m.sample_size, m.sample_size, m.in_channels)
    samples = sample_classes(task, model, shape, seed, guidance_scale)  # (K, N, H, W, C)
    k, n = samples.shape[:2]
    pred = clf.predict(samples.reshape(k * n, -1)).reshape(k, n)
    per_class = (pred == np.arange(k)[:, None]).mean(axis=1)
    confusion = np.stack([np.bincount(p, minlength=k) for p in pred])  # (true, predicted)
    images.save_grid(
        jnp.asarray(samples[:, : min(n, 16)].reshape(-1, *samples.shape[2:])),
        os.path.join(workdir, f"{stem}.png"),
        ncol=min(n, 16),
    )
    sc = task.sampling
    scale = sc.guidance_scale if guidance_scale is None else guidance_scale
    result = {
        "checkpoint_step": int(step),
        "num_per_class": n,
        "sampler": {
            "method": sc.method,
            "num_steps": sc.num_steps,
            "guidance_scale": scale,
        },
        "classifier": "sklearn SVC(C=10, rbf, gamma=scale) on real train pixels",
        "real_test_accuracy": real_acc,
        "sample_accuracy": float(per_class.mean()),
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion.tolist(),
    }
    with open(os.path.join(workdir, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=2)
    Workdir(workdir).log(
        event="eval_digits", **{k: v for k, v in result.items() if k != "confusion"}
    )
    return result


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax's INFO lines would bury the table
    f = flags.FLAGS
    r = evaluate(f.workdir, f.num_per_class, f.seed, f.data_dir, f.guidance_scale)
    rows = [{"class": c, "accuracy": a} for c, a in enumerate(r["per_class_accuracy"])]
    rows.append({"class": "mean", "accuracy": r["sample_accuracy"]})
    print(markdown_table(rows, ["class", "accuracy"]))
    print(
        f"step {r['checkpoint_step']}, guidance {r['sampler']['guidance_scale']}: "
        f"sample accuracy {r['sample_accuracy']:.3f} "
        f"({r['num_per_class']} per class); classifier on real test digits "
        f"{r['real_test_accuracy']:.3f}"
    )


if __name__ == "__main__":
    # Flags are defined only when run as a script, so experiments modules import together.
    flags.DEFINE_string("workdir", None, "a digits training run's workdir")
    flags.DEFINE_integer("num_per_class", 50, "samples per class label")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_string("data_dir", None, "tfds data_dir (default: the run's)")
    flags.DEFINE_float("guidance_scale", None, "CFG scale (default: the run's sample config)")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
