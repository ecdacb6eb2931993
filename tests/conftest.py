"""Test setup, before jax is imported: 8 fake CPU devices for sharding tests, and cheap XLA
compilation (the suite is dominated by compile time of tiny programs; optimisation level 0
changes no results beyond float round-off, which every tolerance here allows)."""

import os

_FLAGS = (
    "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)
_existing = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_existing] + [f for f in _FLAGS if f.split("=")[0] not in _existing]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Two xdist workers share the 2 cores: one OpenMP thread each for torch / BLAS (more threads spin
# on busy cores and made torch calls several times slower under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402  (after the environment above, before jax is imported by tests)


@pytest.fixture(scope="session")
def tiny_ldm(tmp_path_factory):
    """The tiny VAE + latent U-Net run shared by test_ldm.py and test_adapters_train.py
    (_ldm_fixtures.py): (vae workdir, ldm workdir, data_dir, summary)."""
    from _ldm_fixtures import tiny_ldm_runs

    return tiny_ldm_runs(tmp_path_factory, os.environ.get("PYTEST_XDIST_WORKER", "master"))
