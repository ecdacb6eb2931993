"""The shapes judge: caption parser against the generator's labels and pixel geometry, GenEval
scoring with an oracle reader built from the labels, blur against scipy, `:runlocal` training,
the committed judge on real shapes/tiny test images, and bad input."""

import os

import numpy as np
import pytest
import scipy.ndimage

from configs import shapes_judge as judge_config
from diffusion import data
from diffusion.data import shapes as shapes_lib
from diffusion.metrics import shapes_judge as sj
from experiments import train_judge

COMMITTED = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "shapes_judge")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    data.prepare("shapes/tiny", d)
    return d


@pytest.fixture(scope="module")
def examples():
    return [shapes_lib.make_example(np.random.default_rng([7, i]), 32) for i in range(1500)]


def _oracle(examples):
    """Readings straight from the generator's labels (0 where a head does not apply)."""
    idx = np.stack([sj.head_labels(e) for e in examples])
    return {k: np.maximum(idx[:, i], 0) for i, k in enumerate(sj.HEADS)}


# ----------------------------------------------------------------------------- captions


def test_parse_equals_generator_labels_and_geometry(examples):
    forms = set()
    for ex in examples:
        p = sj.parse_caption(ex["caption"])
        assert p == sj.labels_to_attributes(ex), ex["caption"]
        (x1, y1), (x2, y2) = ex["centers"]
        if p["count"] == 1:  # grid cell from the centre, thresholds at thirds of the image
            row, col = int(y1 >= 32 / 3) + int(y1 >= 64 / 3), int(x1 >= 32 / 3) + int(x1 >= 64 / 3)
            assert p["position"] == sj.GRID[3 * row + col], ex["caption"]
            forms.add(p["position"])
        else:  # shape1 is the one whose centre is higher (above) or further left
            first = int(y2 < y1) if p["relation"] == "above" else int(x2 < x1)
            s, c = ex["shapes"][first], ex["colors"][first]
            assert (p["shape1"], p["color1"]) == (sj.SHAPES[s], list(sj.COLORS)[c])
            forms.add(shapes_lib.RELATIONS[int(ex["relation"])])
    assert forms == set(sj.GRID) | set(shapes_lib.RELATIONS[1:])  # every form was parsed


def test_parse_canonical_order_case_and_errors():
    a = sj.parse_caption("a red circle below a blue square on a black background")
    b = sj.parse_caption("  A Blue  square above a red circle on a black background ")
    assert a == b and a["shape1"] == "square" and a["relation"] == "above"
    c = sj.parse_caption("a red circle to the right of a blue square on a gray background")
    assert c["relation"] == "to the left of" and c["color1"] == "blue" and c["color2"] == "red"
    with pytest.raises(ValueError, match=r"unknown word 'purple'.*vocabulary.*'magenta'"):
        sj.parse_caption("a purple circle at the top on a black background")
    with pytest.raises(ValueError, match="none of the generator's forms"):
        sj.parse_caption("a red circle on a black background")
    with pytest.raises(ValueError, match="expected a color .* got 'circle'"):
        sj.parse_caption("a circle red at the top on a black background")
    with pytest.raises(ValueError, match="expected a background .* got 'red'"):
        sj.parse_caption("a red circle at the top on a red background")


# ----------------------------------------------------------------------------- scoring


def test_oracle_scores_one_and_wrong_captions_lower_it(examples):
    captions = [e["caption"] for e in examples]
    readings = _oracle(examples)
    s = sj.score_readings(readings, captions)
    assert s["adherence"] == 1.0 and set(s["accuracy"].values()) == {1.0}
    assert s["num"]["count"] == len(examples) == s["num"]["position"] + s["num"]["relation"]
    # "A above B" rewritten as "B below A" describes the same image: still all correct.
    flipped = [sj.parse_caption(c) for c in captions]
    rewrite = [
        f"a {p['color2']} {p['shape2']} below a {p['color1']} {p['shape1']} "
        f"on a {p['background']} background"
        for p in flipped
        if p["count"] == 2 and p["relation"] == "above"
    ]
    keep = [i for i, p in enumerate(flipped) if p["count"] == 2 and p["relation"] == "above"]
    sub = {k: v[keep] for k, v in readings.items()}
    assert sj.score_readings(sub, rewrite)["adherence"] == 1.0
    # Wrong colour for every third image: exactly those fail, and only on color1.
    wrong = list(captions)
    for i in range(0, len(wrong), 3):
        w = wrong[i].split()
        w[1] = "green" if w[1] != "green" else "red"  # "a <color1> ..."; first-named shape
        wrong[i] = " ".join(w)
    s = sj.score_readings(readings, wrong)
    bad = np.zeros(len(wrong), bool)
    bad[::3] = True
    assert s["adherence"] == pytest.approx(1 - bad.mean())
    assert [not r["adherent"] for r in s["records"]] == bad.tolist()
    assert s["accuracy"]["count"] == 1.0 and s["accuracy"]["background"] == 1.0
    assert s["accuracy"]["color1"] < 1.0 or s["accuracy"]["color2"] < 1.0
    r = next(r for r in s["records"] if not r["adherent"])
    assert sum(not ok for ok in r["correct"].values()) == 1 and r["stated"] != r["read"]


def _pixel_splits(ex, half=16):
    """{relation: (holds, index of the shape in the first half)} read off the pixels: a split
    holds when one shape's pixels all lie in rows (columns) < half and the other's all >= half."""
    masks = [np.all(ex["image"] == list(sj.COLORS.values())[c], -1) for c in ex["colors"]]
    out = {}
    for axis, relation in ((1, "above"), (0, "to the left of")):
        ext = [np.nonzero(m.any(axis))[0] for m in masks]  # rows (columns) each shape covers
        first = int(ext[1].max() < ext[0].min())
        out[relation] = (ext[first].max() < half <= ext[1 - first].min(), first)
    return out


def test_relations_follow_pixels_both_ways(examples):
    # Two shapes can be separated both ways; then the caption naming the other relation is
    # true too and must score adherent; where only one split holds it must fail.
    two = [e for e in examples if e["num_shapes"] == 2 and e["colors"][0] != e["colors"][1]]
    captions, expect = [], []
    for e in two:
        splits, stated = _pixel_splits(e), sj.parse_caption(e["caption"])
        assert splits[stated["relation"]][0], e["caption"]  # the generator's relation is true
        other = sj.CANONICAL_RELATIONS[stated["relation"] == "above"]
        holds, first = splits[other]
        (c1, s1), (c2, s2) = [
            (list(sj.COLORS)[e["colors"][j]], sj.SHAPES[e["shapes"][j]]) for j in (first, 1 - first)
        ]
        bg = stated["background"]
        captions.append(f"a {c1} {s1} {other} a {c2} {s2} on a {bg} background")
        expect.append(bool(holds))
    s = sj.score_readings(_oracle(two), captions)
    assert [r["adherent"] for r in s["records"]] == expect
    assert 20 < sum(expect) < len(expect) - 20  # both cases occur


def test_gaussian_blur_matches_scipy():
    x = np.random.default_rng(0).normal(size=(3, 12, 10, 2)).astype(np.float32)
    sigmas = np.array([0.5, 1.0, 0.8], np.float32)
    got = np.asarray(sj.gaussian_blur(x, sigmas))
    for i, s in enumerate(sigmas):
        want = scipy.ndimage.gaussian_filter(
            x[i], (s, s, 0), mode="nearest", truncate=3 / s, radius=(3, 3, 0)
        )
        np.testing.assert_allclose(got[i], want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sj.gaussian_blur(x, 0.0)), x, atol=1e-6)


# ----------------------------------------------------------------------------- training


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # FD of 64 images
def test_runlocal_training_learns_and_saves(tmp_path, data_dir):
    cfg = judge_config.get_config("runlocal")
    cfg.data.data_dir = data_dir
    r = train_judge.train(cfg, str(tmp_path))
    chance = np.mean([1 / len(sj.ATTRIBUTES[k]) for k in r["accuracy"]])
    assert np.mean(list(r["accuracy"].values())) > chance + 0.1, r["accuracy"]
    losses = [
        float(x.split('"loss": ')[1].split(",")[0])
        for x in open(tmp_path / "metrics.jsonl")
        if '"loss"' in x
    ]
    assert losses[-1] < 0.8 * losses[0]
    for name in ("report.md", "eval.json", "config.json", "judge.safetensors"):
        assert (tmp_path / name).is_file()
    images, captions, _ = sj.real_images("shapes/tiny", "test", data_dir)
    loaded = sj.load(str(tmp_path))
    assert loaded.score(images, captions)["accuracy"] == pytest.approx(r["accuracy"])


# ----------------------------------------------------------------------------- committed judge


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # FD of 64 images
def test_committed_judge_reads_real_test_images(data_dir):
    judge = sj.load(COMMITTED)
    images, captions, _ = sj.real_images("shapes/tiny", "test", data_dir)
    s = judge.score(images, captions)
    assert s["adherence"] >= 0.9, s["accuracy"]
    assert min(s["accuracy"].values()) >= 0.9, s["accuracy"]
    f = judge.features(images)
    assert f.shape == (64, judge.config.features) and np.isfinite(f).all()
    train = sj.real_images("shapes/tiny", "train", data_dir)[0][:64]
    noise = np.random.default_rng(0).uniform(-1, 1, images.shape).astype(np.float32)
    fd_real = sj.fd_in_judge_features(judge, train, data_dir=data_dir, name="shapes/tiny")
    assert fd_real == pytest.approx(sj.fd_in_judge_features(judge, train, reference=f))
    assert fd_real < 0.5 * sj.fd_in_judge_features(judge, noise, reference=images)
    assert sj.fd_in_judge_features(judge, images, reference=f) == pytest.approx(0, abs=1e-2)


def test_bad_input(tmp_path):
    judge = sj.load(COMMITTED)
    ok = np.zeros((2, 32, 32, 3), np.float32)
    caps = ["a red circle at the top on a black background"] * 2
    with pytest.raises(ValueError, match=r"images must be \(N, 32, 32, 3\).*\(2, 64, 64, 3\)"):
        judge.score(np.zeros((2, 64, 64, 3), np.float32), caps)
    with pytest.raises(ValueError, match=r"images must be in \[-1, 1\]"):
        judge.read(ok + 255.0)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        judge.score(ok, caps[:1])
    with pytest.raises(ValueError, match="unknown word 'sphere'"):
        judge.score(ok, ["a red sphere at the top on a black background"] * 2)
    with pytest.raises(FileNotFoundError, match="judge_config.json not found"):
        sj.load(str(tmp_path))
