"""Flax NNX models (NHWC) mirroring diffusers/transformers classes."""
