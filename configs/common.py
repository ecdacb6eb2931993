"""The one parser for config variants: `--config configs/x.py:runlocal,size=64`.

    v = common.parse(arg, flags=("runlocal", "flow"), size=32)
    v.runlocal, v.flow, v.size  # -> True / False, ..., 64

Comma-separated items after the colon are flags (a bare name: True when given) or `key=value`
for the keys the config declares, converted to the type of the key's default (bool accepts
true/false/1/0). An unknown flag or key raises an error listing the valid ones. Leaf overrides of
the finished config stay on the command line: `--config.optim.lr=1e-4`.
"""

from __future__ import annotations

import os

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The shapes VAE trained here, committed as an fp16 diffusers AutoencoderKL folder with its latent
# scaling_factor (benchmarks/results/shapes_vae/README.md): the latent configs' default VAE.
SHAPES_VAE = os.path.join(REPO, "benchmarks", "results", "shapes_vae", "vae")

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _convert(key: str, text: str, default):
    if isinstance(default, bool):
        if text.lower() not in _TRUE + _FALSE:
            raise ValueError(f"variant {key}={text!r}: expected one of {_TRUE + _FALSE}")
        return text.lower() in _TRUE
    if default is None:
        return text
    try:
        return type(default)(text)
    except ValueError as e:
        raise ValueError(f"variant {key}={text!r}: expected {type(default).__name__}") from e


def parse(arg: str | None, flags=(), **keys) -> ml_collections.ConfigDict:
    """Flags (False unless named) and keys (their defaults unless `key=value`) from `arg`."""
    out, unknown = {**dict.fromkeys(flags, False), **keys}, []
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        name, eq, text = item.partition("=")
        if (eq and name not in keys) or (not eq and name not in flags):
            unknown.append(item)
        else:
            out[name] = _convert(name, text, keys[name]) if eq else True
    if unknown:
        raise ValueError(
            f"unknown variants {unknown}; valid flags: {sorted(flags)}, "
            f"valid keys (key=value): {sorted(keys) or 'none'}"
        )
    return ml_collections.ConfigDict(out)
