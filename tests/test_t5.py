"""T5 encoder vs transformers' T5EncoderModel (CPU, fp32) on two tiny configs: T5 v1.1
(gated-gelu, SD3's text_encoder_3) and T5 v1.0 (relu), with and without a padding mask, loaded
through models.load_diffusers from a save_pretrained folder and written back."""

import jax
import numpy as np
import pytest
import torch
import transformers

from diffusion import models
from diffusion.models import t5

CONFIGS = {
    # relative distances up to 15 cover both the exact and the logarithmic buckets
    "v1_1_gated_gelu": dict(feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                            relative_attention_max_distance=12, num_layers=2),
    "v1_0_relu": dict(feed_forward_proj="relu", relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, num_layers=3),
}  # fmt: skip
L = 15


def _reference(name, path):
    cfg = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_heads=4, is_encoder_decoder=False,
        use_cache=False, dropout_rate=0.0, **CONFIGS[name],
    )  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.T5EncoderModel(cfg).eval()
    with torch.no_grad():  # random weights of unit scale: every term matters
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) / (p.shape[-1] ** 0.5 if p.ndim == 2 else 1.0))
    ref.save_pretrained(path)
    return ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_t5_matches_transformers(name, tmp_path):
    ref = _reference(name, tmp_path / "ref")
    ours = models.load_diffusers(str(tmp_path / "ref"))
    assert isinstance(ours, t5.T5EncoderModel)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 64, size=(2, L))
    mask = np.ones((2, L), np.int64)
    mask[1, 9:] = 0
    for m in (None, mask):
        with torch.no_grad():
            want = ref(
                torch.from_numpy(ids), attention_mask=None if m is None else torch.from_numpy(m)
            ).last_hidden_state.numpy()
        got = np.asarray(jax.jit(lambda i, a: ours(i, a)[0])(ids, m))
        rel = np.abs(got - want).max() / np.abs(want).max()
        print(f"T5 {name} mask={m is not None}: max rel diff {rel:.2e}")
        assert rel <= 1e-4, (name, m is not None, rel)
    # Written back, transformers reads it (tied embedding saved once as shared.weight).
    models.save_diffusers(ours, str(tmp_path / "ours"))
    back = transformers.T5EncoderModel.from_pretrained(str(tmp_path / "ours")).eval()
    with torch.no_grad():
        again = back(torch.from_numpy(ids)).last_hidden_state.numpy()
        want = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(again, want, rtol=1e-6, atol=1e-6)


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-300, 301)[None, :]
    for buckets, dist in ((32, 128), (8, 12)):
        want = T5Attention._relative_position_bucket(
            torch.from_numpy(rel), bidirectional=True, num_buckets=buckets, max_distance=dist
        ).numpy()
        got = np.asarray(t5.relative_position_bucket(rel, buckets, dist))
        np.testing.assert_array_equal(got, want)


def test_bad_config():
    with pytest.raises(ValueError, match="feed_forward_proj"):
        t5.T5Config(feed_forward_proj="gated-swiglu")
