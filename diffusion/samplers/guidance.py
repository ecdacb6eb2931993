"""Placeholder: classifier-free guidance (filled in by a sampler helper)."""
