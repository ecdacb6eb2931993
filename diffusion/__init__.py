"""JAX/Flax NNX diffusion: schedules, samplers, models, training. See README.md and DESIGN."""
