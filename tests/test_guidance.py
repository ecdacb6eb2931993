"""Classifier-free guidance: one batched call, same result as two separate calls, diffusers'
rescale_noise_cfg, and pytree conditioning (text + pooled embeddings + class labels)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from diffusion import predictions, samplers, schedules
from diffusion.samplers import guidance

B, H, C, L, E, P = 3, 4, 2, 5, 6, 7
_rs = np.random.RandomState(0)
W_EMB = jnp.asarray(_rs.randn(E, C), jnp.float32)
W_POOL = jnp.asarray(_rs.randn(P, C), jnp.float32)
LABEL_EMB = jnp.asarray(_rs.randn(10, C), jnp.float32)


def make_model(batch_sizes=None):
    """A toy conditional network (B, H, H, C) -> (B, H, H, C) on a dict of conditioning."""

    def model_fn(x, model_time, cond):
        if batch_sizes is not None:
            batch_sizes.append(x.shape[0])  # counts traces; use under eager or with callbacks
        shift = (
            jnp.mean(cond["text"], axis=1) @ W_EMB  # (B, C)
            + cond["pooled"] @ W_POOL
            + LABEL_EMB[cond["label"]]
        )
        return jnp.tanh(x * (1.0 + model_time / 1000.0) + shift[:, None, None, :])

    return model_fn


def make_cond(seed, batch=B):
    rs = np.random.RandomState(seed)
    return {
        "text": jnp.asarray(rs.randn(batch, L, E), jnp.float32),
        "pooled": jnp.asarray(rs.randn(batch, P), jnp.float32),
        "label": jnp.asarray(rs.randint(0, 10, batch)),
    }


X = jnp.asarray(_rs.randn(B, H, H, C), jnp.float32)


@pytest.mark.parametrize("scale", [1.5, 7.5])
def test_cfg_equals_two_separate_calls(scale):
    sizes = []
    model = make_model(sizes)
    cond, uncond = make_cond(1), make_cond(2)
    got = guidance.cfg_model(model, cond, uncond, scale)(X, 500.0)
    assert sizes == [2 * B]  # one batched call
    pred_c, pred_u = model(X, 500.0, cond), model(X, 500.0, uncond)
    np.testing.assert_allclose(got, pred_u + scale * (pred_c - pred_u), rtol=1e-5, atol=1e-6)


def test_negative_prompt_broadcast():
    """A single negative conditioning (leading axis 1) is used for every sample."""
    model = make_model()
    cond, neg = make_cond(1), make_cond(3, batch=1)
    got = guidance.cfg_model(model, cond, neg, 4.0)(X, 10.0)
    neg_b = jax.tree.map(lambda a: jnp.repeat(a, B, axis=0), neg)
    pred_c, pred_u = model(X, 10.0, cond), model(X, 10.0, neg_b)
    np.testing.assert_allclose(got, pred_u + 4.0 * (pred_c - pred_u), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_rescale_matches_diffusers(phi):
    rs = np.random.RandomState(4)
    cfg, text = rs.randn(B, H, H, C) * 3.0, rs.randn(B, H, H, C)
    # diffusers works in NCHW; the per-sample std is over all non-batch axes either way.
    to_t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
    want = rescale_noise_cfg(to_t(cfg), to_t(text), guidance_rescale=phi).numpy()
    got = guidance.rescale_cfg(jnp.asarray(cfg, jnp.float32), jnp.asarray(text, jnp.float32), phi)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-5, atol=1e-6)


def test_cfg_model_with_rescale():
    model = make_model()
    cond, uncond = make_cond(1), make_cond(2)
    got = guidance.cfg_model(model, cond, uncond, 5.0, rescale=0.7)(X, 200.0)
    pred_c, pred_u = (np.asarray(model(X, 200.0, c), np.float64) for c in (cond, uncond))
    to_t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
    want = rescale_noise_cfg(to_t(pred_u + 5.0 * (pred_c - pred_u)), to_t(pred_c), 0.7)
    np.testing.assert_allclose(got, want.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)


def test_sampler_makes_one_batched_call_per_step():
    """Under a compiled sampler loop: network executions == nfe, each with batch 2B; and the
    result equals sampling with a hand-written two-call guided denoiser."""
    schedule = schedules.get("scaled_linear")
    model = make_model()
    cond, uncond = make_cond(1), make_cond(2)
    executed = []

    def counted_model(x, model_time, c):
        jax.debug.callback(lambda n: executed.append(int(n)), x.shape[0])
        return model(x, model_time, c)

    den = guidance.cfg_denoiser(counted_model, schedule, "eps", cond, uncond, 6.0)
    n = 4
    out = samplers.sample(den, X, schedule, method="ddim", num_steps=n)
    jax.block_until_ready(out)
    assert executed == [2 * B] * samplers.nfe("ddim", n)

    def two_calls(x, model_time):
        pred_c, pred_u = model(x, model_time, cond), model(x, model_time, uncond)
        return pred_u + 6.0 * (pred_c - pred_u)

    ref_den = predictions.as_denoiser(two_calls, schedule, "eps")
    ref = samplers.sample(ref_den, X, schedule, method="ddim", num_steps=n)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_scale_one_is_conditional_only():
    sizes = []
    model = make_model(sizes)
    cond = make_cond(1)
    got = guidance.cfg_model(model, cond, make_cond(2), 1.0)(X, 3.0)
    assert sizes == [B]
    np.testing.assert_allclose(got, model(X, 3.0, cond))


def test_bad_conditioning():
    model = make_model()
    cond = make_cond(1)
    with pytest.raises(ValueError, match="same pytree structure"):
        guidance.cfg_model(model, cond, {"text": cond["text"]}, 2.0)(X, 1.0)
    bad = dict(make_cond(2), pooled=jnp.zeros((2, P)))
    with pytest.raises(ValueError, match="leading"):
        guidance.cfg_model(model, cond, bad, 2.0)(X, 1.0)
