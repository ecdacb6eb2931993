"""Objectives against independent references: diffusers' SD3 training utilities and min-SNR, the
Bayes-optimality of the exact GMM denoiser, and sample statistics of the time densities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import training_utils

from diffusion import analytic, losses, predictions, schedules


def test_logit_normal_density_statistics():
    obj = losses.Objective(schedules.get("rectified_flow"), "velocity", "logit_normal", 0.3, 0.8)
    u = np.asarray(losses.sample_u(obj, jax.random.key(0), 100_000))
    logit = np.log(u / (1 - u))
    assert abs(logit.mean() - 0.3) < 0.01 and abs(logit.std() - 0.8) < 0.01


def test_mode_density_matches_diffusers_formula():
    obj = losses.Objective(schedules.get("rectified_flow"), "velocity", "mode", mode_scale=1.29)
    u = np.asarray(losses.sample_u(obj, jax.random.key(1), 200_000))
    torch.manual_seed(0)
    ref = training_utils.compute_density_for_timestep_sampling(
        "mode", batch_size=200_000, logit_mean=0.0, logit_std=1.0, mode_scale=1.29
    ).numpy()
    qs = np.linspace(0.05, 0.95, 19)
    np.testing.assert_allclose(np.quantile(u, qs), np.quantile(ref, qs), atol=0.01)


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap"])
def test_sd3_weights_match_diffusers(scheme):
    s = schedules.get("rectified_flow", shift=3.0)
    t = jnp.linspace(0.05, 0.95, 11)
    obj = losses.Objective(s, "velocity", weighting=scheme)
    ref = training_utils.compute_loss_weighting_for_sd3(
        scheme, torch.tensor(np.asarray(s.sigma(t)))
    )
    np.testing.assert_allclose(losses.loss_weight(obj, t), ref.numpy(), rtol=1e-5)


@pytest.mark.parametrize("ptype", ["eps", "v", "x0"])
def test_min_snr_matches_paper(ptype):
    """Hang et al. 2023: eps -> min(SNR, g)/SNR, v -> min(SNR, g)/(SNR+1), x0 -> min(SNR, g)."""
    s = schedules.get("linear")
    t = s.t_from_timestep(jnp.arange(0, 1000, 37))
    snr = np.asarray(jnp.exp(2 * s.logsnr(t)), np.float64)
    ref = np.minimum(snr, 5.0) / {"eps": snr, "v": snr + 1, "x0": np.ones_like(snr)}[ptype]
    obj = losses.Objective(s, ptype, weighting="min_snr", min_snr_gamma=5.0)
    np.testing.assert_allclose(losses.loss_weight(obj, t), ref, rtol=2e-4)


def test_discrete_times_on_table():
    s = schedules.get("linear")
    t = losses.sample_t(losses.Objective(s), jax.random.key(2), 4096)
    k = np.asarray(t) * 1000 - 1
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)
    assert k.min() >= 0 and k.max() <= 999 and len(np.unique(np.round(k))) > 900


@pytest.mark.parametrize("ptype", ["eps", "x0", "v", "velocity"])
def test_exact_denoiser_minimises_loss(ptype):
    """The Bayes-optimal predictor (exact GMM posterior mean, converted to the target type) has a
    lower loss than perturbed predictors, on the same noise draws."""
    sched = schedules.get("rectified_flow" if ptype == "velocity" else "vp_cosine")
    gmm = analytic.make_gmm("gmm2d")
    x0 = gmm.sample(jax.random.key(3), 4096)
    obj = losses.Objective(sched, ptype, time_density="logit_normal")

    def loss_with(perturb):
        def model_fn(x_t, model_time, cond):
            t = cond["t"]
            tb = t.reshape(-1, 1)
            x0_hat = jax.vmap(lambda x, tt: gmm.denoise(x[None], tt, sched)[0])(x_t, t)
            x0_hat = x0_hat + perturb
            return predictions.from_x0(x0_hat, x_t, tb, sched, ptype)

        # pass the sampled t through cond so the exact denoiser sees it (same rng -> same t)
        t = losses.sample_t(obj, jax.random.split(jax.random.key(4), 3)[0], 4096)
        return float(losses.diffusion_loss(obj, model_fn, x0, jax.random.key(4), {"t": t})[0])

    best = loss_with(0.0)
    assert best < loss_with(0.05) and best < loss_with(-0.05)


def test_condition_dropout_fraction_and_errors():
    cond = {"emb": jnp.ones((10_000, 3)), "label": jnp.arange(10_000)}
    null = {"emb": jnp.zeros((3,)), "label": jnp.array(-1)}
    out = losses.drop_condition(jax.random.key(5), cond, null, 0.2)
    dropped = np.asarray(out["label"] == -1)
    assert abs(dropped.mean() - 0.2) < 0.02
    np.testing.assert_array_equal(np.asarray(out["emb"][:, 0] == 0), dropped)
    with pytest.raises(ValueError, match="valid"):
        losses.Objective(schedules.get("linear"), "eps", time_density="beta")
    with pytest.raises(ValueError, match="valid"):
        losses.Objective(schedules.get("linear"), "noise")
