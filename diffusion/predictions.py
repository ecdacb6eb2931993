"""Conversions between network parameterisations, and model function -> denoiser.

With x_t = alpha x_0 + sigma eps (schedules.py), the prediction types are

    "eps"       eps                                   (Ho et al. 2020)
    "x0"        x_0                                    (alias "sample", as diffusers)
    "v"         alpha eps - sigma x_0                  (Salimans & Ho 2022; "v_prediction")
    "velocity"  eps - x_0                              (rectified flow / SD3 "flow_prediction")
    "score"     grad log p_t(x_t) = -eps / sigma

"velocity" is the flow-matching target d x_t / d sigma for alpha = 1 - sigma, defined as
eps - x_0 on every schedule so SD3 checkpoints and flow training agree. Every conversion goes
through x_0, which is what samplers consume (`denoise_fn(x_t, t) -> x0_hat`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from diffusion.schedules import Schedule

PREDICTION_TYPES = ("eps", "x0", "v", "velocity", "score")
_ALIASES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "velocity"}


def canonical(prediction_type: str) -> str:
    """Canonical name of a prediction type; accepts diffusers' spellings."""
    name = _ALIASES.get(prediction_type, prediction_type)
    if name not in PREDICTION_TYPES:
        valid = sorted(PREDICTION_TYPES + tuple(_ALIASES))
        raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {valid}")
    return name


def _coeffs(schedule: Schedule, t, dtype):
    alpha = jnp.asarray(schedule.alpha(t), dtype)
    sigma = jnp.asarray(schedule.sigma(t), dtype)
    return alpha, sigma


def to_x0(pred, x_t, t, schedule: Schedule, prediction_type: str):
    """x0_hat from a network output `pred` of the given type at (x_t, t)."""
    kind = canonical(prediction_type)
    alpha, sigma = _coeffs(schedule, t, x_t.dtype)
    if kind == "x0":
        return pred
    if kind == "eps":
        return (x_t - sigma * pred) / alpha
    if kind == "v":
        # v = alpha eps - sigma x0  =>  x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)
        return (alpha * x_t - sigma * pred) / (alpha**2 + sigma**2)
    if kind == "velocity":
        # eps = u + x0  =>  x_t = (alpha + sigma) x0 + sigma u
        return (x_t - sigma * pred) / (alpha + sigma)
    # score: eps = -sigma * score
    return (x_t + sigma**2 * pred) / alpha


def from_x0(x0, x_t, t, schedule: Schedule, prediction_type: str):
    """The network output of the given type that corresponds to x0 at (x_t, t)."""
    kind = canonical(prediction_type)
    alpha, sigma = _coeffs(schedule, t, x_t.dtype)
    if kind == "x0":
        return x0
    eps = (x_t - alpha * x0) / sigma
    if kind == "eps":
        return eps
    if kind == "v":
        return alpha * eps - sigma * x0
    if kind == "velocity":
        return eps - x0
    return -eps / sigma


def targets(x0, eps, t, schedule: Schedule, prediction_type: str):
    """Training target of the given type for data x0 and noise eps (no division by sigma)."""
    kind = canonical(prediction_type)
    alpha, sigma = _coeffs(schedule, t, x0.dtype)
    return {
        "x0": lambda: x0,
        "eps": lambda: eps,
        "v": lambda: alpha * eps - sigma * x0,
        "velocity": lambda: eps - x0,
        "score": lambda: -eps / sigma,
    }[kind]()


def convert(pred, x_t, t, schedule: Schedule, from_type: str, to_type: str):
    """Convert a prediction between two types (through x0)."""
    if canonical(from_type) == canonical(to_type):
        return pred
    return from_x0(to_x0(pred, x_t, t, schedule, from_type), x_t, t, schedule, to_type)


def as_denoiser(model_fn: Callable, schedule: Schedule, prediction_type: str) -> Callable:
    """Wrap `model_fn(x_t, model_time) -> prediction` as `denoise_fn(x_t, t) -> x0_hat`.

    `model_time` is `schedule.model_time(t)`, a scalar; model_fn broadcasts it over the batch.
    """
    kind = canonical(prediction_type)

    def denoise_fn(x_t, t):
        pred = model_fn(x_t, schedule.model_time(t))
        return to_x0(pred.astype(x_t.dtype), x_t, t, schedule, kind)

    return denoise_fn
