"""CLIP text encoders vs transformers (CPU, fp32), driven by a tiny offline CLIPTokenizer."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file
from tokenizers import pre_tokenizers

from diffusion.models.convert import load_torch_state_dict
from diffusion.models.text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

PROMPTS = ["a cat", "a photo of a dog", "dog at a cat do"]
MAX_LEN = 16


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE CLIP tokenizer built from an in-test vocabulary (no download)."""
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    merges = [("a", "t</w>"), ("c", "at</w>"), ("d", "o"), ("do", "g</w>"), ("o", "f</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def _hf_config(tok, act, eos):
    return transformers.CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        projection_dim=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LEN,
        hidden_act=act,
        bos_token_id=tok.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
    )


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * r if name.endswith("weight") else 0.2 * r)
            elif "embedding" in name:
                p.copy_(r)
            else:
                p.copy_(r / np.sqrt(p.shape[-1]) if p.ndim == 2 else 0.2 * r)


def _reference(tok, act, eos, with_projection, tmp_path):
    torch.manual_seed(0)
    cls = (
        transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    )
    ref = cls(_hf_config(tok, act, eos)).eval()
    _randomize(ref)
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    return ref, config, load_file(str(tmp_path / "model.safetensors"))


# Tiny models: XLA's backend optimizations cost far more compile time than they save at run time.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _rel_err(a, b):
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


CASES = {  # name: (hidden_act, legacy eos id 2?, with projection)
    "quick_gelu": ("quick_gelu", False, False),
    "gelu_projection": ("gelu", False, True),
    "legacy_eos_projection": ("quick_gelu", True, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_transformers(case, tokenizer, tmp_path):
    act, legacy_eos, with_projection = CASES[case]
    eos = 2 if legacy_eos else tokenizer.eos_token_id
    ref, config, sd = _reference(tokenizer, act, eos, with_projection, tmp_path)
    cfg = CLIPTextConfig.from_diffusers(config)
    assert (cfg.hidden_act, cfg.eos_token_id) == (act, eos)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    assert cfg.class_name == cls.diffusers_class
    model = cls(cfg, rngs=nnx.Rngs(0))
    if not with_projection:  # old checkpoints: `text_model.` prefix and a position_ids buffer
        sd = {"text_model." + k: v for k, v in sd.items()}
        sd["text_model.embeddings.position_ids"] = np.arange(MAX_LEN)[None]
    load_torch_state_dict(model, sd)

    enc = tokenizer(PROMPTS, padding="max_length", max_length=MAX_LEN, return_tensors="np")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert mask.min() == 0  # padding is exercised
    graphdef, state = nnx.split(model)
    apply = _jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m, output_hidden_states=True))
    for use_mask in (True, False) if case == "quick_gelu" else (True,):
        with torch.no_grad():
            out = ref(
                torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask) if use_mask else None,
                output_hidden_states=True,
            )
        ours = apply(state, ids, mask if use_mask else None)
        first = out.text_embeds if with_projection else out.pooler_output
        want = {"first": first, "last": out.last_hidden_state, "penult": out.hidden_states[-2]}
        # transformers' tuple orders: (text_embeds, last, hidden) / (last, pooled, hidden)
        first, last = (ours[0], ours[1]) if with_projection else (ours[1], ours[0])
        got = {"first": first, "last": last, "penult": ours[2][-2]}
        assert len(ours[2]) == len(out.hidden_states) == 4
        for k in want:
            err = _rel_err(got[k], want[k].numpy())
            assert err <= 1e-4, f"{case} mask={use_mask} {k}: max rel err {err:.2e}"


def test_config_round_trip_and_errors(tokenizer):
    hf = _hf_config(tokenizer, "gelu", tokenizer.eos_token_id).to_dict()
    cfg = CLIPTextConfig.from_diffusers(hf)
    assert CLIPTextConfig.from_diffusers(cfg.to_diffusers()) == cfg
    back = transformers.CLIPTextConfig.from_dict(cfg.to_diffusers())
    assert (back.hidden_size, back.hidden_act) == (32, "gelu")
    assert back.eos_token_id == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig.from_diffusers(dict(hf, hidden_act="relu"))
    with pytest.raises(ValueError, match="attention_dropout"):
        CLIPTextConfig.from_diffusers(dict(hf, attention_dropout=0.1))
    model = CLIPTextModel(CLIPTextConfig.from_diffusers(hf), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(np.zeros((1, MAX_LEN + 1), np.int32))


def test_grads_finite_bf16_and_remat(tokenizer):
    hf = _hf_config(tokenizer, "quick_gelu", tokenizer.eos_token_id).to_dict()
    hf["num_hidden_layers"] = 2
    enc = tokenizer(PROMPTS, padding="max_length", max_length=MAX_LEN, return_tensors="np")
    ids, mask = enc["input_ids"], enc["attention_mask"]

    def run(**kw):
        dtype = kw.pop("dtype", jnp.float32)
        cfg = CLIPTextConfig.from_diffusers(hf, class_name="CLIPTextModelWithProjection", **kw)
        model = CLIPTextModelWithProjection(cfg, rngs=nnx.Rngs(0), dtype=dtype)
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            emb, last = nnx.merge(graphdef, p)(ids, mask)
            return jnp.mean(jnp.square(emb.astype(jnp.float32))) + jnp.mean(
                jnp.square(last.astype(jnp.float32))
            ), emb

        return _jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, emb), grads = run()
    (_, emb_remat), grads_remat = run(remat=True)
    (_, emb16), grads16 = run(dtype=jnp.bfloat16)
    for g in (grads, grads_remat, grads16):
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
    np.testing.assert_allclose(emb_remat, emb, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_remat), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert emb16.dtype == jnp.bfloat16
    assert _rel_err(emb16.astype(jnp.float32), emb) < 5e-2
