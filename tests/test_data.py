"""diffusion.data: offline tfds builders, grain pipelines, sharding, resume, latent cache.

References are independent of the code under test: sklearn's arrays for digits, pixel colours and
geometry read off the images for shapes, analytic.make_gmm for the mixture, numpy pooling for the
latent cache, jax.image.resize for resizing.
"""

import re

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion import analytic, data
from diffusion.data import shapes as shapes_lib
from diffusion.data.builders import png_bytes


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    for name in ("digits", "shapes/tiny", "gmm/tiny"):
        data.prepare(name, str(d))
    return str(d)


def pipe(name, split, data_dir, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    kw.setdefault("seed", 0)
    kw.setdefault("num_threads", 1)
    return data.make_pipeline(name, split, data_dir=data_dir, **kw)


def take(loader_or_iter, n):
    it = iter(loader_or_iter)
    return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------- digits


def test_digits_match_sklearn(data_dir):
    from sklearn.datasets import load_digits

    ref = load_digits()
    train, test = (
        data.load_source("digits", "train", data_dir),
        data.load_source("digits", "test", data_dir),
    )
    assert len(train) + len(test) == len(ref.target) == 1797
    assert sorted(int(test[i]["index"]) for i in range(len(test))) == list(range(len(train), 1797))
    for j in range(0, len(train), 97):
        ex = train[j]
        i = int(ex["index"])
        assert ex["image"].shape == (8, 8, 1) and ex["image"].dtype == np.uint8
        assert int(ex["label"]) == ref.target[i]
        np.testing.assert_array_equal(ex["image"][..., 0], np.round(ref.images[i] * 255 / 16))


def test_plain_tfds_reads_prepared_data_without_tensorflow(data_dir):
    import sys

    import tensorflow_datasets as tfds

    ds = tfds.data_source("shapes/tiny", data_dir=data_dir)  # tfds's own reader, from files
    assert len(ds["train"]) == 256 and ds["test"][0]["image"].shape == (32, 32, 3)
    assert "tensorflow" not in sys.modules  # preparing and reading never imported TensorFlow


def test_pipeline_normalises_in_order(data_dir):
    src = data.load_source("digits", "test", data_dir)
    (batch,) = take(pipe("digits", "test", data_dir, batch_size=16, shuffle=False), 1)
    assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    want = np.stack([src[i]["image"] for i in range(16)]).astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(batch["image"], want)
    full = np.concatenate(
        [b["image"] for b in pipe("digits", "test", data_dir, batch_size=100, num_epochs=1)]
    )
    assert full.min() == -1.0 and full.max() == 1.0


def test_pipeline_resize_matches_bilinear(data_dir):
    (a,) = take(pipe("digits", "test", data_dir, batch_size=8, shuffle=False), 1)
    (b,) = take(pipe("digits", "test", data_dir, batch_size=8, shuffle=False, image_size=16), 1)
    assert b["image"].shape == (8, 16, 16, 1)
    # Upsampling: PIL bilinear and jax's half-pixel bilinear agree up to uint8 rounding.
    want = jax.image.resize((a["image"] + 1) * 127.5, (8, 16, 16, 1), "bilinear") / 127.5 - 1
    np.testing.assert_allclose(b["image"], want, atol=1.01 / 127.5)


def test_preprocess_center_crop_and_nested_features():
    img = np.random.default_rng(0).integers(0, 256, size=(10, 6, 3), dtype=np.uint8)
    ex = {
        "image": img,
        "attributes": {"Smiling": np.bool_(True)},
        "id": b"003",
        "label": np.int64(7),
    }
    out = data.Preprocess(image_size=6).map(ex)
    np.testing.assert_array_equal(out["image"], img[2:8].astype(np.float32) / 127.5 - 1)
    assert out["attributes"]["Smiling"] == True and out["id"] == "003"  # noqa: E712
    assert out["label"].dtype == np.int32


# ----------------------------------------------------------------------------- shapes

_CAPTION = re.compile(
    r"^a (\w+) (\w+)(?: (above|below|to the left of|to the right of) a (\w+) (\w+)| at the ([\w ]+))"
    r" on a (\w+) background$"
)


def _classify(img, color, cx, cy, r):
    """Shape kind read off the pixels of its bounding box."""
    box = np.all(img[cy - r : cy + r + 1, cx - r : cx + r + 1] == color, axis=-1)
    fill, bottom = box.mean(), box[-1].mean()
    if bottom > 0.9:
        return "square" if fill > 0.95 else "triangle"
    return "circle" if fill > 0.65 else "diamond"


def _check_shapes_example(ex, size):
    img, caption = ex["image"], ex["caption"].decode()
    m = _CAPTION.match(caption)
    assert m, caption
    c1, s1, rel, c2, s2, where, bg = m.groups()
    assert tuple(img[0, 0]) == shapes_lib.BACKGROUNDS[bg], caption
    named = [(c1, s1)] + ([(c2, s2)] if rel else [])
    assert int(ex["num_shapes"]) == len(named)
    for j, (color, shape) in enumerate(named):
        (cx, cy), r = ex["centers"][j], int(ex["radii"][j])
        assert tuple(img[cy, cx]) == shapes_lib.COLORS[color], caption
        assert _classify(img, shapes_lib.COLORS[color], cx, cy, r) == shape, caption
    if rel:
        (x1, y1), (x2, y2) = ex["centers"]
        ok = {
            "above": y1 < y2,
            "below": y1 > y2,
            "to the left of": x1 < x2,
            "to the right of": x1 > x2,
        }
        assert ok[rel], caption
    else:
        x, y = ex["centers"][0]
        vert = ["top", "", "bottom"][min(3 * y // size, 2)]
        horiz = ["left", "", "right"][min(3 * x // size, 2)]
        assert where == (f"{vert} {horiz}".strip() or "center"), caption
    assert shapes_lib.SHAPES[int(ex["label"])] == s1


def test_shapes_captions_match_pixels(data_dir):
    src = data.load_source("shapes/tiny", "train", data_dir)
    assert len(src) == 256
    counts = np.zeros(2, int)
    for i in range(len(src)):
        ex = src[i]
        assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
        _check_shapes_example(ex, 32)
        counts[int(ex["num_shapes"]) - 1] += 1
    assert counts.min() > 50  # both one- and two-shape examples occur


def test_shapes_deterministic_and_64px():
    # The stored data is a pure function of (seed, split, index); also exercises 64x64 layout.
    for i in range(40):
        a = shapes_lib.make_example(np.random.default_rng([0, 0, i]), 64)
        b = shapes_lib.make_example(np.random.default_rng([0, 0, i]), 64)
        np.testing.assert_array_equal(a["image"], b["image"])
        _check_shapes_example({**a, "caption": a["caption"].encode()}, 64)


def test_shapes_stored_equals_regenerated(data_dir):
    src = data.load_source("shapes/tiny", "test", data_dir)
    for j in range(0, len(src), 9):
        ex = src[j]
        want = shapes_lib.make_example(np.random.default_rng([0, 1, int(ex["index"])]), 32)
        np.testing.assert_array_equal(ex["image"], want["image"])  # PNG round trip is lossless
        assert ex["caption"].decode() == want["caption"]


def test_shapes_pipeline_batch(data_dir):
    (b,) = take(pipe("shapes/tiny", "train", data_dir, batch_size=8), 1)
    assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["image"].min() >= -1 and b["image"].max() <= 1
    assert b["caption"].shape == (8,) and all(c.startswith("a ") for c in b["caption"])
    assert b["centers"].shape == (8, 2, 2) and b["centers"].dtype == np.int32


# ----------------------------------------------------------------------------- gmm


def test_gmm_matches_analytic(data_dir):
    gmm, ref = data.load_gmm("gmm/tiny", data_dir), analytic.make_gmm("gmm2d")
    for field in ("weights", "means", "variances"):
        np.testing.assert_allclose(getattr(gmm, field), getattr(ref, field))
    x = np.concatenate(
        [b["x"] for b in pipe("gmm/tiny", "train", data_dir, batch_size=64, num_epochs=1)]
    )
    assert x.shape == (1024, 2) and x.dtype == np.float32
    w, mu, var = ref.weights, ref.means, ref.variances
    mean = w @ mu  # mixture mean and total variance per coordinate
    total_var = w @ (var + mu**2) - mean**2
    np.testing.assert_allclose(x.mean(0), mean, atol=4 * np.sqrt(total_var.max() / len(x)))
    np.testing.assert_allclose(x.var(0), total_var, rtol=0.15)


# ----------------------------------------------------------------------------- sharding, order


def _indices(loader):
    return np.concatenate([b["index"] for b in loader])


def test_two_process_shards_disjoint_and_covering(data_dir):
    kw = dict(batch_size=10, num_epochs=1, process_count=2)
    shards = [_indices(pipe("digits", "test", data_dir, process_index=p, **kw)) for p in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 150
    assert not set(shards[0]) & set(shards[1])
    assert sorted(np.concatenate(shards)) == list(range(1497, 1797))


def test_seed_determinism(data_dir):
    def xs(seed, num_epochs=1):  # gmm/tiny test split: 256 vectors, cheap to read
        loader = pipe("gmm/tiny", "test", data_dir, batch_size=32, num_epochs=num_epochs, seed=seed)
        return np.concatenate([b["x"] for b in loader])

    a, b, c = xs(3), xs(3), xs(4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(np.unique(a, axis=0), np.unique(c, axis=0))
    # A new epoch is a new permutation of the same shard.
    two = xs(3, num_epochs=2)
    assert not np.array_equal(two[:256], two[256:])
    np.testing.assert_array_equal(np.unique(two[:256], axis=0), np.unique(two[256:], axis=0))


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for x, y in zip(batches_a, batches_b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_resume_mid_epoch_exact(data_dir):
    make = lambda: pipe("digits", "test", data_dir, batch_size=32, process_count=2, process_index=1)
    it = iter(make())
    take(it, 3)
    state = it.get_state()
    ref = take(it, 6)  # 150 records per shard -> 4 batches per epoch: crosses an epoch boundary
    it2 = iter(make())
    it2.set_state(state)
    _assert_same(ref, take(it2, 6))


def test_resume_through_orbax(data_dir, tmp_path):
    import orbax.checkpoint as ocp

    make = lambda: pipe("shapes/tiny", "train", data_dir, batch_size=8)
    it = iter(make())
    take(it, 5)
    with ocp.CheckpointManager(
        tmp_path / "ckpt", item_handlers={"data": data.checkpoint_handler()}
    ) as m:
        m.save(5, args=ocp.args.Composite(data=data.checkpoint_save(it)))
        m.wait_until_finished()
    ref = take(it, 4)
    it2 = iter(make())
    with ocp.CheckpointManager(
        tmp_path / "ckpt", item_handlers={"data": data.checkpoint_handler()}
    ) as m:
        m.restore(5, args=ocp.args.Composite(data=data.checkpoint_restore(it2)))
    _assert_same(ref, take(it2, 4))


# ----------------------------------------------------------------------------- errors


def test_unknown_name_lists_valid(data_dir):
    with pytest.raises(ValueError, match="digits.*gmm.*shapes"):
        pipe("no_such_dataset", "train", data_dir, batch_size=4)
    with pytest.raises(ValueError, match="32x32"):
        pipe("shapes/huge", "train", data_dir, batch_size=4)
    with pytest.raises(ValueError, match="valid.*train"):
        pipe("digits", "validation", data_dir, batch_size=4)


def test_missing_tfds_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(ValueError) as err:
        pipe("cifar10", "train", str(tmp_path), batch_size=4)
    assert f"tfds build cifar10 --data_dir={tmp_path} --file_format=array_record" in str(err.value)
    assert not (tmp_path / "cifar10").exists()  # nothing was downloaded or generated


class _UserDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Stands in for a dataset a user prepared with `tfds build NAME --file_format=array_record`
    (mnist-like: 28x28x1 images, labels): not one of our built-ins, read back from files only."""

    name = "user_mnist_like"
    code_path = None  # as in diffusion/data/builders.py (no checksums lookup)
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 24), "test": self._generate_examples(24, 32)}

    def _generate_examples(self, start, stop):
        for i in range(start, stop):
            image = np.full((28, 28, 1), 8 * i, np.uint8)  # value encodes the index
            yield i, {"image": png_bytes(image), "label": i % 10}


def test_prepared_tfds_dataset_read_by_name_from_tfds_data_dir(tmp_path, monkeypatch):
    _UserDataset(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))  # no data_dir: found through the env
    batches = take(pipe("user_mnist_like", "train", None, batch_size=8, shuffle=False), 3)
    images = np.concatenate([b["image"] for b in batches])  # (24, 28, 28, 1) in [-1, 1]
    labels = np.concatenate([b["label"] for b in batches])
    assert images.shape == (24, 28, 28, 1)
    index = np.round((images[:, 0, 0, 0] + 1) * 127.5 / 8).astype(int)  # undo [-1, 1] scaling
    np.testing.assert_array_equal(np.sort(index), np.arange(24))
    np.testing.assert_array_equal(labels, index % 10)
    want = np.broadcast_to((8 * index[:, None, None, None]) / 127.5 - 1, images.shape)
    np.testing.assert_allclose(images, want, atol=1e-6)


# ----------------------------------------------------------------------------- latent cache


def test_latent_cache_round_trip(data_dir, tmp_path):
    def encode(x):  # 2x2 average pooling, (B, 8, 8, 1) -> (B, 4, 4, 1)
        b, h, w, c = x.shape
        return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))

    out = tmp_path / "latents"
    data.cache_latents(
        "digits", encode, str(out), data_dir=data_dir, name="digits_pooled", batch_size=128
    )
    test_src = data.load_source("digits", "test", data_dir)
    batches = list(pipe("digits_pooled", "test", str(out), batch_size=50, num_epochs=1))
    assert len(batches) == 6
    for b in batches:
        assert b["latent"].shape == (50, 4, 4, 1) and b["latent"].dtype == np.float32
        for z, src_i, idx, label in zip(b["latent"], b["source_index"], b["index"], b["label"]):
            ex = test_src[int(src_i)]
            assert int(ex["index"]) == idx  # other features travel with the latent
            img = ex["image"][..., 0].astype(np.float64) / 127.5 - 1
            pooled = np.array(
                [
                    [img[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean() for j in range(4)]
                    for i in range(4)
                ]
            )
            np.testing.assert_allclose(z[..., 0], pooled, atol=1e-6)
            assert label == ex["label"]
