"""Placeholder: filled in by the sampler helpers."""

METHODS = {}
