"""Small built-in datasets as tfds builders that prepare offline into array_record files.

This file: shared helpers and `Digits` (scikit-learn's 8x8 handwritten digits); `Shapes` lives
in shapes.py and `Gmm` in gmm.py. Each builder writes with
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
