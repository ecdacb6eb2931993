"""The in-house digits classifier: training, files, the committed weights, bad input."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from diffusion import metrics
from diffusion.metrics import classifier, digits_classifier

COMMITTED = os.path.join(
    os.path.dirname(__file__), "..", "benchmarks", "results", "digits_classifier"
)


@pytest.fixture(scope="module")
def real_test():
    return digits_classifier.real_digits("digits", "test")


def test_train_save_load(tmp_path, real_test):
    """A short run learns (well above chance), and the saved files reload to the same model:
    the loaded logits give exactly the accuracy train() recorded."""
    result = digits_classifier.train(str(tmp_path), steps=40, batch_size=64)
    assert result["test_accuracy"] > 0.5
    features_fn, logits_fn = digits_classifier.load(str(tmp_path))
    x, y = real_test
    assert features_fn(x[:5]).shape == (5, 128)
    acc = float(np.mean(np.argmax(np.asarray(logits_fn(x)), -1) == y))
    assert acc == result["test_accuracy"]


def test_committed_classifier(real_test):
    """The committed weights (experiments.train_digits_classifier) read real test digits as the
    JSON says, and its features separate real digits from noise by a wide FD margin."""
    with open(os.path.join(COMMITTED, "digits_classifier.json")) as f:
        record = json.load(f)
    features_fn, logits_fn = digits_classifier.load(COMMITTED)
    x, y = real_test
    acc = float(np.mean(np.argmax(np.asarray(logits_fn(x)), -1) == y))
    assert abs(acc - record["test_accuracy"]) <= 1 / 300 and acc >= 0.96
    x_train, _ = digits_classifier.real_digits("digits", "train")
    noise = np.random.default_rng(0).uniform(-1, 1, x.shape).astype(np.float32)
    f_test, f_train, f_noise = (np.asarray(features_fn(a)) for a in (x, x_train[:600], noise))
    assert metrics.frechet_distance(f_train, f_test) < 0.1 * metrics.frechet_distance(
        f_noise, f_test
    )


def test_shift_augment_moves_content():
    img = np.full((1, 8, 8, 1), -1.0, np.float32)
    img[0, 3, 4, 0] = 1.0
    out = np.asarray(digits_classifier.shift_augment(jax.random.key(0), np.repeat(img, 64, 0)))
    rows, cols = np.nonzero(out[..., 0] == 1.0)[1:]
    assert set(rows) == {2, 3, 4} and set(cols) == {3, 4, 5}  # every shift in [-1, 1]^2 occurs
    assert np.all((out == 1.0).sum(axis=(1, 2, 3)) == 1) and np.all(out[out != 1.0] == -1.0)


def test_bad_input(tmp_path):
    shutil.copytree(COMMITTED, tmp_path / "c")
    features_fn, _ = digits_classifier.load(str(tmp_path / "c"))
    with pytest.raises(ValueError, match="images must be \\(N >= 1, 8, 8, 1\\)"):
        features_fn(np.zeros((2, 16, 16, 1), np.float32))
    record = json.loads((tmp_path / "c" / "digits_classifier.json").read_text())
    record["config"]["channels"] = [32, 48]
    (tmp_path / "c" / "digits_classifier.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="stages.1.conv1.kernel: file shape \\(3, 3, 32, 64\\)"):
        digits_classifier.load(str(tmp_path / "c"))
    record["config"]["width"] = 3
    (tmp_path / "c" / "digits_classifier.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="unknown classifier config keys \\['width'\\]"):
        classifier.load_model(str(tmp_path / "c"), digits_classifier.STEM)
    with pytest.raises(FileNotFoundError):
        digits_classifier.load(str(tmp_path / "missing"))
