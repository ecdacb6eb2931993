"""Test setup, before jax is imported: 8 fake CPU devices for sharding tests, and cheap XLA
compilation (the suite is dominated by compile time of tiny programs; optimisation level 0
changes no results beyond float round-off, which every tolerance here allows).

One persistent compilation cache per pytest run, made by the process that starts first (the
xdist controller) and inherited through the environment by the workers and by the training
subprocesses tests start: a program compiled in one process loads in the others (the same
model's init and train step compile in several test files and CLI runs; 12% less CPU time on
test_train*.py). It is removed when that process ends; JAX_COMPILATION_CACHE_DIR set by the
caller is kept and used.
"""

import os
import shutil
import tempfile

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
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="jax-diffusion-tests-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # tiny programs add up
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402  (after the environment above, before jax is imported by tests)


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_ldm(tmp_path_factory):
    """The tiny VAE + latent U-Net run shared by test_ldm.py and test_adapters_train.py
    (_ldm_fixtures.py): (vae workdir, ldm workdir, data_dir, summary)."""
    from _ldm_fixtures import tiny_ldm_runs

    return tiny_ldm_runs(tmp_path_factory, os.environ.get("PYTEST_XDIST_WORKER", "master"))
