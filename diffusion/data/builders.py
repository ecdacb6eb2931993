"""Small built-in datasets as tfds builders that prepare offline into array_record files.

`Digits` (scikit-learn's 8x8 handwritten digits) and `Gmm` (vectors from a Gaussian mixture);
the procedural `Shapes` builder lives in shapes.py. Each builder writes with
`download_and_prepare(file_format="array_record")`, so `tfds.data_source` and grain can read
the result without TensorFlow.

Writing needs no TensorFlow as long as no feature asks tfds to *encode* an image array: tfds's
`Image` feature calls `tf.image.encode_png` on numpy input, but it stores already-encoded bytes
as they are. Builders therefore hand it PNG bytes made with PIL (`png_bytes`); decoding on read
uses PIL too.

The builders skip tfds's global registration (`skip_registration=True`): they are found through
`diffusion.data.DATASETS`, and prepared data is read back from files with
`tfds.core.read_only_builder.builder_from_files`, which needs no builder code.

NO_CODE_PATH: each builder sets `code_path = None`. tfds derives it from the module's package
path to look for a checksums file next to the code, and that lookup needs the
`importlib_resources` backport (not installed); offline builders have no checksums anyway.
"""

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, C) uint8 -> PNG bytes via PIL (tfds's own encoder needs TensorFlow)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"png_bytes expects (H, W, 1|3) uint8, got {image.shape} {image.dtype}")
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) uint8 -> (size, size, C) uint8 with PIL bilinear resampling."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    squeeze = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(pil.resize((size, size), Image.BILINEAR))
    return out[..., None] if squeeze else out


# ----------------------------------------------------------------------------- digits


@dataclasses.dataclass(eq=False)
class DigitsConfig(tfds.core.BuilderConfig):
    size: int = 8  # output side length; 8 is the original resolution


class Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """scikit-learn's `load_digits` (1797 8x8 grey images, UCI optdigits), no download needed.

    Pixel values 0..16 are scaled to 0..255 (rounded). Split: train = first 1497 images,
    test = last 300 (sklearn's order). `index` is the row in `load_digits()`, so labels can be
    checked against sklearn.
    """

    name = "digits"
    code_path = None  # see NO_CODE_PATH in builders.py
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        DigitsConfig(name="8x8", size=8, description="original 8x8"),
        DigitsConfig(name="16x16", size=16, description="PIL bilinear upsampling to 16x16"),
        DigitsConfig(name="32x32", size=32, description="PIL bilinear upsampling to 32x32"),
    ]
    NUM_TRAIN = 1497

    def _info(self):
        s = self.builder_config.size
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(s, s, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
                "index": tfds.features.Scalar(dtype=np.int64),
            }
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn 8x8 handwritten digits (UCI optdigits).",
            features=features,
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        )

    def _split_generators(self, dl_manager):
        n = self.NUM_TRAIN
        return {
            "train": self._generate_examples(0, n),
            "test": self._generate_examples(n, None),
        }

    def _generate_examples(self, start, stop):
        from sklearn.datasets import load_digits

        digits = load_digits()
        # 0..16 -> 0..255; (N, 8, 8) -> (N, 8, 8, 1)
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        stop = len(images) if stop is None else stop
        for i in range(start, stop):
            image = resize_uint8(images[i], self.builder_config.size)
            yield i, {"image": png_bytes(image), "label": int(digits.target[i]), "index": i}


# ----------------------------------------------------------------------------- gmm


@dataclasses.dataclass(eq=False)
class GmmConfig(tfds.core.BuilderConfig):
    dim: int = 2
    num_components: int = 8
    num_train: int = 65536
    num_test: int = 8192
    seed: int = 0


def gmm_params(dim: int, num_components: int, seed: int) -> dict[str, np.ndarray]:
    """Deterministic mixture parameters: weights (K,), means (K, d), covs (K, d, d).

    Means ~ N(0, 2^2 I); each covariance is Q diag(s^2) Q^T with a random rotation Q and
    standard deviations s ~ U[0.15, 0.5], so components are anisotropic but well separated in
    low dimension. Weights ~ Dirichlet(5) (non-uniform, none tiny).
    """
    rng = np.random.default_rng([seed, dim, num_components])
    weights = rng.dirichlet(np.full(num_components, 5.0))
    means = 2.0 * rng.standard_normal((num_components, dim))
    q, _ = np.linalg.qr(rng.standard_normal((num_components, dim, dim)))  # (K, d, d)
    stds = rng.uniform(0.15, 0.5, size=(num_components, dim))
    covs = np.einsum("kij,kj,klj->kil", q, stds**2, q)  # (K, d, d)
    return {"weights": weights, "means": means, "covs": covs}


def sample_gmm(params: dict[str, np.ndarray], n: int, rng: np.random.Generator):
    """Draw n samples; returns (x (n, d) float32, component (n,) int64)."""
    k = rng.choice(len(params["weights"]), size=n, p=params["weights"])
    chol = np.linalg.cholesky(params["covs"])  # (K, d, d)
    z = rng.standard_normal((n, params["means"].shape[1]))
    x = params["means"][k] + np.einsum("nij,nj->ni", chol[k], z)  # (n, d)
    return x.astype(np.float32), k


class Gmm(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Vectors from a fixed Gaussian mixture; `label` is the component index.

    The mixture (see `gmm_params`) is stored in the dataset's metadata (weights, means, covs),
    so exact-density metrics can be computed from the prepared data alone.
    """

    name = "gmm"
    code_path = None  # see NO_CODE_PATH in builders.py
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        GmmConfig(name="d2", dim=2, num_components=8),
        GmmConfig(name="d8", dim=8, num_components=8),
        GmmConfig(name="d64", dim=64, num_components=16),
        GmmConfig(name="tiny", dim=2, num_components=4, num_train=1024, num_test=256),
    ]

    def _params(self):
        c = self.builder_config
        return gmm_params(c.dim, c.num_components, c.seed)

    def _info(self):
        c = self.builder_config
        params = {k: v.tolist() for k, v in self._params().items()}
        return tfds.core.DatasetInfo(
            builder=self,
            description="Samples from a Gaussian mixture (diffusion.data.builders.gmm_params).",
            features=tfds.features.FeaturesDict(
                {
                    "x": tfds.features.Tensor(shape=(c.dim,), dtype=np.float32),
                    "label": tfds.features.ClassLabel(num_classes=c.num_components),
                }
            ),
            supervised_keys=("x", "label"),
            metadata=tfds.core.MetadataDict(**params),
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        return {
            "train": self._generate_examples(0, c.num_train),
            "test": self._generate_examples(1, c.num_test),
        }

    def _generate_examples(self, split_id, n):
        rng = np.random.default_rng([self.builder_config.seed, split_id])
        x, k = sample_gmm(self._params(), n, rng)
        for i in range(n):
            yield i, {"x": x[i], "label": int(k[i])}
