"""FID's Inception-v3 as a Flax NNX module (channels-last), loading pytorch-fid's weights.

FID (Heusel et al. 2017) is defined with the 2015-12-05 TensorFlow Inception graph; pytorch-fid
ports it as torchvision's Inception3 with FID-specific blocks (`FIDInceptionA/C/E_1/E_2`: the
pooling branches average without counting padding, as TensorFlow's average pool does, and the
last block max-pools instead). This module reproduces that network with the same parameter names,
so the standard weights file pt_inception-2015-12-05-6726825d.pth loads directly:

    features_fn = metrics.inception.load("pt_inception-2015-12-05-6726825d.pth")
    feats = features_fn(images)   # (N, H, W, 3) float in [0, 1] -> (N, 2048) pool features
    fid = metrics.frechet_distance(feats_real, feats_fake)

Input handling is pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)`: bilinear
resize to 299 x 299 (half-pixel centres, i.e. align_corners=False, no antialiasing, also when
downsampling) and [0, 1] -> [-1, 1]. Weights: torch zip or legacy files (read without torch,
see torch_files.py) or a safetensors conversion (`python -m tools.convert_inception`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen import avg_pool, max_pool

from diffusion import models
from diffusion.metrics.torch_files import read_state_dict
from diffusion.models import convert

SIZE = 299
NUM_CLASSES = 1008  # the TF graph's classifier (1000 ImageNet classes + 8 unused)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
    """torchvision BasicConv2d: conv (no bias) -> BatchNorm(eps=1e-3, running stats) -> ReLU."""

    def __init__(self, c_in, c_out, kernel_size, *, stride=1, padding=0, rngs: nnx.Rngs):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(c_in, c_out, _pair(kernel_size), strides=_pair(stride),
                             padding=((ph, ph), (pw, pw)), use_bias=False, rngs=rngs)  # fmt: skip
        self.bn = nnx.BatchNorm(c_out, use_running_average=True, epsilon=1e-3, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_same(x):
    """3x3 stride-1 average pool, padding 1, padding not counted (TensorFlow's, FID blocks)."""
    return avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nnx.Module):
    """pytorch-fid FIDInceptionA (35 x 35 grid)."""

    def __init__(self, c_in, pool_features, *, rngs):
        self.branch1x1 = BasicConv2d(c_in, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_same(x))
        return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """torchvision InceptionB (grid reduction 35 -> 17)."""

    def __init__(self, c_in, *, rngs):
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = max_pool(x, (3, 3), (2, 2))
        return jnp.concatenate([self.branch3x3(x), b3, bp], axis=-1)


class InceptionC(nnx.Module):
    """pytorch-fid FIDInceptionC (17 x 17 grid, factorised 7x7 convolutions)."""

    def __init__(self, c_in, channels_7x7, *, rngs):
        c7 = channels_7x7
        row, col = dict(padding=(0, 3)), dict(padding=(3, 0))  # (1, 7) and (7, 1) kernels
        self.branch1x1 = BasicConv2d(c_in, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), **row, rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), **col, rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), **col, rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), **row, rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), **col, rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), **row, rngs=rngs)
        self.branch_pool = BasicConv2d(c_in, 192, 1, rngs=rngs)

    def __call__(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        bp = self.branch_pool(_avg_pool_same(x))
        return jnp.concatenate([self.branch1x1(x), b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    """torchvision InceptionD (grid reduction 17 -> 8)."""

    def __init__(self, c_in, *, rngs):
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return jnp.concatenate([b3, b7, max_pool(x, (3, 3), (2, 2))], axis=-1)


class InceptionE(nnx.Module):
    """pytorch-fid FIDInceptionE_1 (pool="avg") / FIDInceptionE_2 (pool="max") (8 x 8 grid)."""

    def __init__(self, c_in, pool: str, *, rngs):
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(c_in, 192, 1, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        # FIDInceptionE_2 max-pools here (a quirk of the TF graph that FID is defined with).
        pooled = (
            _avg_pool_same(x)
            if self.pool == "avg"
            else max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        )
        return jnp.concatenate([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
    """The FID Inception-v3 up to its 2048-d average pool (pytorch-fid block 3), plus `fc`.

    Parameter names are torchvision's Inception3 (aux_logits=False, 1008 classes), with
    BatchNorm running statistics called `mean` / `var` here (see `torch_key_map`).
    """

    def __init__(self, *, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, "avg", rngs=rngs)
        self.Mixed_7c = InceptionE(2048, "max", rngs=rngs)
        self.fc = nnx.Linear(2048, NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
        """x: (N, 299, 299, 3) in [-1, 1] -> (N, 2048) pool features."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 147, 147, 64)
        x = max_pool(x, (3, 3), (2, 2))  # (N, 73, 73, 64)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 71, 71, 192)
        x = max_pool(x, (3, 3), (2, 2))  # (N, 35, 35, 192)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)  # ends at (N, 8, 8, 2048)
        return jnp.mean(x, axis=(1, 2))

    def logits(self, features):
        """(N, 2048) pool features -> (N, 1008) logits of the TF graph (Inception Score)."""
        return self.fc(features)

    @staticmethod
    def torch_key_map(key: str) -> str | None:
        if key.endswith(".num_batches_tracked"):
            return None
        return key.replace(".running_mean", ".mean").replace(".running_var", ".var")

    @staticmethod
    def torch_key_unmap(key: str) -> str:
        return key.replace(".bn.mean", ".bn.running_mean").replace(".bn.var", ".bn.running_var")


def preprocess(images):
    """pytorch-fid's input handling: (N, H, W, 3) in [0, 1] -> (N, 299, 299, 3) in [-1, 1]."""
    x = jax.image.resize(images, (images.shape[0], SIZE, SIZE, 3), "bilinear", antialias=False)
    return 2.0 * x - 1.0


@functools.cache
def _abstract_split():
    """(graphdef, abstract state) of the network: built once by tracing (no random init, which
    would compile one program per parameter shape), merged into a fresh module per load."""
    return nnx.split(models.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0))))


def _abstract() -> InceptionV3:
    return nnx.merge(*_abstract_split())


@functools.cache
def _expected_tensors() -> dict:
    """Checkpoint key -> (torch-layout shape, dtype) of the FID network."""
    return convert.abstract_torch_state_dict(_abstract())


def _check_state_dict(state_dict, path: str) -> dict:
    """Key-by-key comparison with the FID network; a clear error naming the tensors if not."""
    want = _expected_tensors()
    got = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    misshaped = [(k, tuple(got[k].shape), want[k][0]) for k in sorted(set(want) & set(got))
                 if tuple(got[k].shape) != tuple(want[k][0])]  # fmt: skip
    if missing or unexpected or misshaped:
        show = lambda items: ", ".join(str(i) for i in items[:5]) + (" ..." * (len(items) > 5))
        raise convert.StateDictError(
            f"{path} is not the FID Inception-v3 (pt_inception-2015-12-05): "
            f"{len(missing)} missing tensors [{show(missing)}], {len(unexpected)} unexpected "
            f"[{show(unexpected)}], {len(misshaped)} mis-shaped [{show(misshaped)}] "
            "(name, file shape, expected shape)"
        )
    return got


def from_state_dict(state_dict, path: str = "state dict") -> InceptionV3:
    """An InceptionV3 holding the given torch-named weights (checked to be the FID network)."""
    state_dict = _check_state_dict(state_dict, path)
    model = _abstract()
    convert.load_torch_state_dict(model, state_dict)
    return model


_preprocess = jax.jit(preprocess)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x):
    """The network on preprocessed (N, 299, 299, 3) input; weights are an argument (not baked in
    as constants), and the program is shared by every load (graphdef is the static key)."""
    return nnx.merge(graphdef, state)(x)


def load(path: str) -> Callable:
    """`features_fn(images)`: (N, H, W, 3) float in [0, 1] -> (N, 2048) float32 pool features,
    from pytorch-fid's weights file (torch zip / legacy format) or its safetensors conversion.

    The resize is compiled per input shape and the network per batch size (so one network
    program serves every image size); call it with a fixed batch size (see features.extract).
    """
    graphdef, state = nnx.split(from_state_dict(read_state_dict(path), path))

    def features_fn(images):
        images = jnp.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
            raise ValueError(f"images must be (N >= 1, H, W, 3) in [0, 1], got {images.shape}")
        return _forward(graphdef, state, _preprocess(images.astype(jnp.float32)))

    return features_fn
