"""Train the digits classifier whose features give "FD in digits-classifier features".

    python -m experiments.train_digits_classifier --workdir benchmarks/results/digits_classifier

Trains metrics.classifier.ConvClassifier (conv 32-32 | pool | 64-64, 128-d features) on the
built-in digits train split (random 1-pixel shifts) and writes to the workdir:
digits_classifier.safetensors + digits_classifier.json (weights, config, input range, accuracy on
the real test split; what `metrics.digits_classifier.load(workdir)` reads), config.json (the
flags), metrics.jsonl (loss every 100 steps and the final accuracies) and report.md.
"""

from __future__ import annotations

import time

from absl import app, flags

from diffusion.metrics import digits_classifier
from diffusion.workdir import Workdir


def main(argv):
    del argv
    f = flags.FLAGS
    args = {k: f[k].value for k in ("dataset", "steps", "batch_size", "lr", "seed", "data_dir")}
    wd = Workdir(f.workdir, {"command": "experiments.train_digits_classifier", **args})
    start = time.time()
    result = digits_classifier.train(
        f.workdir, **args, log=lambda step, loss: wd.log(step=step, loss=loss)
    )
    seconds = time.time() - start
    wd.log(event="train_digits_classifier", seconds=round(seconds, 1), **result)
    wd.write_report(
        f"# Digits classifier ({args['dataset']})\n\n"
        f"Accuracy on the real test split ({result['num_test']} images): "
        f"{result['test_accuracy']:.4f}; on the train split {result['train_accuracy']:.4f}.\n"
        f"{args['steps']} steps, batch {args['batch_size']}, lr {args['lr']}, seed "
        f"{args['seed']}; {seconds:.0f} s on this machine.\n\n"
        'Its 128-d penultimate features define "FD in digits-classifier features" '
        "(`metrics.digits_classifier.load`); that is not FID.\n"
    )
    print(f"test accuracy {result['test_accuracy']:.4f} ({seconds:.0f} s)")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "output directory (weights, config, metrics, report)")
    flags.DEFINE_string("dataset", "digits", "built-in digits config: digits, digits/16x16, ...")
    flags.DEFINE_integer("steps", 2000, "training steps")
    flags.DEFINE_integer("batch_size", 128, "batch size")
    flags.DEFINE_float("lr", 2e-3, "peak learning rate (cosine decay)")
    flags.DEFINE_integer("seed", 0, "initialisation, shuffling and augmentation seed")
    flags.DEFINE_string("data_dir", None, "tfds data_dir (default: $TFDS_DATA_DIR or ~)")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
