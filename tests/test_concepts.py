"""The fine-tuning measures of diffusion/adapters/concepts.py read generator images right.

The generator draws flat colours without anti-aliasing and knows every layout, so each measure
has an exact answer on its images: purple examples are all purple and ordinary ones none, the
subject is found and its mirror image (blue left of yellow) is not, and a record's layout mask
covers exactly its shapes (IoU 1 with the image's foreground), while another record's does not.
"""

import numpy as np
import pytest

from diffusion.adapters import concepts
from diffusion.data import shapes

N = 24


def _ordinary(n, seed=3, max_shapes=2):
    rng = lambda i: np.random.default_rng([seed, i])
    return [shapes.make_example(rng(i), 32, max_shapes) for i in range(n)]


def test_color_fraction_is_one_on_the_new_colour_and_zero_elsewhere():
    purple, captions = concepts.examples("new_color", N, seed=5)
    assert all(" purple " in c for c in captions)
    np.testing.assert_array_equal(concepts.color_fraction(purple, "purple"), np.ones(N))
    plain = np.stack([e["image"] for e in _ordinary(N)])
    np.testing.assert_array_equal(concepts.color_fraction(plain, "purple"), np.zeros(N))
    # float images in [-1, 1] read the same as uint8
    as_float = purple.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(concepts.color_fraction(as_float, "purple"), np.ones(N))


def test_is_subject_finds_the_subject_not_its_mirror_or_plain_squares():
    subject, captions = concepts.examples("subject", N, seed=5)
    assert all(c.startswith(f"a {concepts.SUBJECT_TOKEN} square") for c in captions)
    assert concepts.is_subject(subject).all()
    assert not concepts.is_subject(subject[:, :, ::-1]).any()  # blue left of yellow
    # single squares of any colour (two shapes, a yellow one left of a blue one, would pass)
    squares = [e["image"] for e in _ordinary(200, max_shapes=1) if e["shapes"][0] == 1]
    assert len(squares) > 5 and not concepts.is_subject(np.stack(squares)).any()
    assert concepts.class_prompt(captions[0]) == captions[0].replace("sks ", "")


def test_mask_iou_of_an_image_with_its_own_layout_is_one():
    examples = _ordinary(N)
    images = np.stack([e["image"] for e in examples])
    masks = np.stack([concepts.layout_mask(e, 32) for e in examples])
    np.testing.assert_allclose(concepts.mask_iou(images, masks), np.ones(N))
    shifted = concepts.mask_iou(images, np.roll(masks, 1, axis=0))  # another example's layout
    assert shifted.mean() < 0.3
    # control_images: the same masks as 3 equal channels, nearest-neighbour at another size
    batch = {k: np.stack([e[k] for e in examples]) for k in ("num_shapes", "shapes", "centers",
                                                              "radii")}  # fmt: skip
    ctrl = concepts.control_images(batch, 64)
    assert ctrl.shape == (N, 64, 64, 3) and (ctrl[..., 0] == ctrl[..., 2]).all()
    np.testing.assert_array_equal(ctrl[:, ::2, ::2, 0], masks)


def test_unknown_concept_lists_the_valid_ones():
    with pytest.raises(ValueError, match="new_color.*subject"):
        concepts.examples("new_shape", 2, 0)
