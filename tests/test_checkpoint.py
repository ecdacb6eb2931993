"""diffusion/checkpoint.py: bit-exact round trips, keep-N, best-by-metric, resharding on
restore, data-iterator state, and fallback from a corrupt latest step."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multihost_worker import MIN_SIZE, compiled_step, init_state, make_batches, train

from diffusion import sharding
from diffusion.checkpoint import Checkpointer


def _host(tree):
    """Host numpy copy of a pytree (same structure); typed PRNG keys as their key data."""

    def leaf(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(x)

    return jax.tree.map(leaf, tree)


def _assert_bit_exact(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(_host(a)), jax.tree.leaves(_host(b))):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """State after 2 steps on an fsdp=8 mesh, saved at step 2 (with a data state)."""
    mesh = sharding.make_mesh({"fsdp": 8})
    state, _, shardings = train(mesh, 2)
    saved = _host(state)
    directory = tmp_path_factory.mktemp("ckpt") / "run"
    with Checkpointer(directory) as ckpt:
        assert ckpt.save(2, state, data_state={"epoch": 0, "index": 32})
        # The async save must not be affected by the next step donating `state`'s buffers.
        batch = jax.device_put(make_batches(1, seed=5)[0], sharding.batch_sharding(mesh))
        state, _ = compiled_step(mesh, shardings)(state, batch)
        ckpt.wait_until_finished()
    assert int(state["step"]) == 3
    return directory, saved


def test_round_trip_bit_exact(trained):
    directory, state = trained
    mesh = sharding.make_mesh({"fsdp": 8})
    target = sharding.abstract_state(init_state, mesh, min_size=MIN_SIZE)
    with Checkpointer(directory) as ckpt:
        assert ckpt.latest_step() == 2
        restored = ckpt.restore(abstract_state=target)
    assert restored.step == 2 and restored.data_state == {"epoch": 0, "index": 32}
    _assert_bit_exact(restored.state, state)
    assert int(restored.state["step"]) == 2
    assert jnp.issubdtype(restored.state["rng"].dtype, jax.dtypes.prng_key)  # still a typed key
    for got, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(target)):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)


@pytest.mark.parametrize("shape", [{"data": 2, "fsdp": 4}, "one_device"])
def test_restore_onto_other_mesh(trained, shape):
    directory, state = trained
    if shape == "one_device":
        mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    else:
        mesh = sharding.make_mesh(shape)
    target = sharding.abstract_state(init_state, mesh, min_size=MIN_SIZE)
    with Checkpointer(directory) as ckpt:
        restored = ckpt.restore(2, abstract_state=target)
    _assert_bit_exact(restored.state, state)
    kernel = restored.state["params"]["conv_in"]["kernel"].get_value()
    assert kernel.sharding.mesh.shape == mesh.shape
    print(f"restored onto {dict(mesh.shape)}: conv_in.kernel spec {kernel.sharding.spec}")
    # Explicit shardings argument instead of shardings carried by the target.
    with Checkpointer(directory) as ckpt:
        shards = jax.tree.map(lambda x: x.sharding, target)
        again = ckpt.restore(2, abstract_state=target, shardings=shards)
    _assert_bit_exact(again.state, state)


def _small(step):
    return {"w": jnp.full((4, 4), float(step)), "step": jnp.asarray(step, jnp.int32)}


def test_keep_n(tmp_path):
    with Checkpointer(tmp_path / "k", max_to_keep=2) as ckpt:
        for s in range(1, 5):
            ckpt.save(s, _small(s))
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
        restored = ckpt.restore(abstract_state=_small(0))
    assert restored.step == 4 and restored.data_state is None
    _assert_bit_exact(restored.state, _small(4))


def test_best_by_metric(tmp_path):
    losses = {1: 3.0, 2: 1.0, 3: 4.0, 4: 2.0, 5: 5.0}
    with Checkpointer(tmp_path / "b", max_to_keep=2, best_metric="loss", best_mode="min") as ckpt:
        for s, loss in losses.items():
            ckpt.save(s, _small(s), metrics={"loss": loss})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2, 4]
        assert ckpt.best_step() == 2
        with pytest.raises(ValueError, match="best_metric"):
            ckpt.save(6, _small(6), metrics={"acc": 1.0})


def test_bytes_data_state(tmp_path):
    blob = b'{"next_index": 7}\x00\xff'
    with Checkpointer(tmp_path / "d") as ckpt:
        ckpt.save(1, _small(1), data_state=blob)
        ckpt.wait_until_finished()
        assert ckpt.restore().data_state == blob
        # Resuming with another process count: the state restores, the data state is None.
        (tmp_path / "d" / "1" / "data" / "process_0-of-1.json").rename(
            tmp_path / "d" / "1" / "data" / "process_0-of-2.json"
        )
        with pytest.warns(UserWarning, match="process_0-of-2.json"):
            restored = ckpt.restore()
        assert restored.step == 1 and restored.data_state is None


def _truncate_arrays(step_dir):
    n = 0
    for root, _, files in os.walk(step_dir / "state"):
        for f in files:
            if os.sep + "d" in root:  # ocdbt data files hold the array bytes
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.truncate(8)
                n += 1
    assert n > 0


@pytest.mark.parametrize("damage", ["truncated", "no_commit_marker", "deleted_item"])
def test_corrupt_latest_falls_back(tmp_path, damage):
    directory = tmp_path / damage
    with Checkpointer(directory, max_to_keep=3) as ckpt:
        for s in (1, 2, 3):
            ckpt.save(s, _small(s), data_state={"pos": s})
        ckpt.wait_until_finished()
    step_dir = directory / "3"
    if damage == "truncated":
        _truncate_arrays(step_dir)
    elif damage == "no_commit_marker":
        os.remove(step_dir / "commit_success.txt")
    else:
        shutil.rmtree(step_dir / "state")
    with Checkpointer(directory, max_to_keep=3) as ckpt:
        with pytest.warns(UserWarning, match="step 3 .* corrupt or partial") as record:
            restored = ckpt.restore(abstract_state=_small(0))
        print(f"{damage}: {record[0].message}")
        assert restored.step == 2 and restored.data_state == {"pos": 2}
        _assert_bit_exact(restored.state, _small(2))
        with pytest.raises(Exception):  # noqa: B017  an explicit step does not fall back
            ckpt.restore(3, abstract_state=_small(0))
        # Quarantining the bad step lets the resumed run save step 3 again.
        with pytest.warns(UserWarning, match="step 3"):
            assert ckpt.restore(abstract_state=_small(0), quarantine_bad=True).step == 2
        assert ckpt.all_steps() == [1, 2]
        ckpt.save(3, _small(30))
        ckpt.wait_until_finished()
        _assert_bit_exact(ckpt.restore(abstract_state=_small(0)).state, _small(30))
    assert (directory / "corrupt" / "3").exists()


def test_no_checkpoint(tmp_path):
    with Checkpointer(tmp_path / "empty") as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError):
            ckpt.restore()
