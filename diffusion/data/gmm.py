"""Samples from a Gaussian mixture as a tfds dataset, with the exact mixture alongside.

The mixture is a `diffusion.analytic.GMM` (diagonal components), so the same object that gives
samplers their exact denoiser also describes the training data. Configs are either
`analytic.PRESETS` by name (gmm2d, gmm2d_separated, gaussian2d, gmm_image) or random diagonal
mixtures of dimension d (d2, d8, d64; see `random_gmm`). The parameters are stored in the
prepared dataset's metadata; `load_gmm(name)` rebuilds the GMM from it.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from diffusion import analytic


@dataclasses.dataclass(eq=False)
class GmmConfig(tfds.core.BuilderConfig):
    preset: str | None = None  # an analytic.PRESETS name, else a random mixture (below)
    dim: int = 2
    num_components: int = 8
    num_train: int = 65536
    num_test: int = 8192
    seed: int = 0


def random_gmm(dim: int, num_components: int, seed: int = 0) -> analytic.GMM:
    """Deterministic random diagonal mixture: weights ~ Dirichlet(5), means ~ N(0, 2^2 I),
    per-coordinate standard deviations ~ U[0.15, 0.5]."""
    rng = np.random.default_rng([seed, dim, num_components])
    weights = rng.dirichlet(np.full(num_components, 5.0))
    means = 2.0 * rng.standard_normal((num_components, dim))
    variances = rng.uniform(0.15, 0.5, size=(num_components, dim)) ** 2
    return analytic.GMM(weights, means, variances, (dim,))


def config_gmm(config: GmmConfig) -> analytic.GMM:
    if config.preset is not None:
        return analytic.make_gmm(config.preset)
    return random_gmm(config.dim, config.num_components, config.seed)


def sample_gmm(gmm: analytic.GMM, n: int, rng: np.random.Generator):
    """n samples in numpy: (x (n, *event_shape) float32, component (n,) int64)."""
    weights = np.asarray(gmm.weights, np.float64)
    k = rng.choice(len(weights), size=n, p=weights / weights.sum())
    means, variances = np.asarray(gmm.means), np.asarray(gmm.variances)  # (K, D)
    x = means[k] + np.sqrt(variances[k]) * rng.standard_normal((n, means.shape[1]))  # (n, D)
    return x.reshape((n, *gmm.event_shape)).astype(np.float32), k


def gmm_from_metadata(metadata) -> analytic.GMM:
    """Rebuild the mixture stored in a prepared gmm dataset's `info.metadata`."""
    return analytic.GMM(
        np.asarray(metadata["weights"], float),
        np.asarray(metadata["means"], float),
        np.asarray(metadata["variances"], float),
        tuple(metadata["event_shape"]),
    )


class Gmm(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Vectors `x` (float32, the mixture's event shape) and `label` = component index."""

    name = "gmm"
    code_path = None  # see NO_CODE_PATH in builders.py
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        GmmConfig(name="gmm2d", preset="gmm2d"),
        GmmConfig(name="gmm2d_separated", preset="gmm2d_separated"),
        GmmConfig(name="gaussian2d", preset="gaussian2d"),
        GmmConfig(name="gmm_image", preset="gmm_image"),
        GmmConfig(name="d2", dim=2, num_components=8),
        GmmConfig(name="d8", dim=8, num_components=8),
        GmmConfig(name="d64", dim=64, num_components=16),
        GmmConfig(name="tiny", preset="gmm2d", num_train=1024, num_test=256),
    ]

    def _info(self):
        gmm = config_gmm(self.builder_config)
        metadata = {
            "weights": np.asarray(gmm.weights).tolist(),
            "means": np.asarray(gmm.means).tolist(),
            "variances": np.asarray(gmm.variances).tolist(),
            "event_shape": list(gmm.event_shape),
        }
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "x": tfds.features.Tensor(shape=tuple(gmm.event_shape), dtype=np.float32),
                    "label": tfds.features.ClassLabel(num_classes=len(metadata["weights"])),
                }
            ),
            supervised_keys=("x", "label"),
            metadata=tfds.core.MetadataDict(**metadata),
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        return {
            "train": self._generate_examples(0, c.num_train),
            "test": self._generate_examples(1, c.num_test),
        }

    def _generate_examples(self, split_id, n):
        rng = np.random.default_rng([self.builder_config.seed, split_id])
        x, k = sample_gmm(config_gmm(self.builder_config), n, rng)
        for i in range(n):
            yield i, {"x": x[i], "label": int(k[i])}
