"""diffusion/sharding.py on 8 fake CPU devices: meshes, logical rules, FSDP-by-size, and sharded
training that matches a single-device run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from multihost_worker import MIN_SIZE, init_state, train

from diffusion import sharding


def test_make_mesh_sizes():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2})
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert dict(sharding.make_mesh((1, -1, 2)).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert dict(sharding.make_mesh({"fsdp": 8}).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    one = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    assert one.devices.size == 1


@pytest.mark.parametrize(
    "shape, match",
    [
        ({"data": 3}, "needs 3 devices"),
        ({"data": -1, "fsdp": 3}, "not divisible by 3"),
        ({"data": -1, "fsdp": -1}, "At most one"),
        ({"model": 2}, "valid axes"),
        ((2, 2), "one size per axis"),
    ],
)
def test_make_mesh_bad_sizes(shape, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(shape)


def test_logical_rules():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.DEFAULT_RULES
    # Activations: batch takes data+fsdp, so embed (fsdp) must stay unsharded.
    spec = sharding.logical_to_spec(("batch", "length", "embed"), rules, mesh, (8, 16, 32))
    assert spec == P(("data", "fsdp"), None, None)
    # Weights: embed over fsdp, mlp over tensor.
    assert sharding.logical_to_spec(("embed", "mlp"), rules, mesh, (32, 64)) == P("fsdp", "tensor")
    # A dim not divisible by its mesh axis is left unsharded.
    assert sharding.logical_to_spec(("embed", "heads"), rules, mesh, (32, 3)) == P("fsdp", None)
    # Config-provided rules with a fallback entry for the same name.
    custom = [("heads", "tensor"), ("mlp", "tensor"), ("mlp", "fsdp")]
    assert sharding.logical_to_spec(("heads", "mlp"), custom, mesh, (4, 8)) == P("tensor", "fsdp")
    s = sharding.logical_to_sharding(("batch", None), mesh, rules, (8, 3))
    assert s.spec == P(("data", "fsdp"), None) and s.mesh is mesh
    with pytest.raises(ValueError, match="no rule"):
        sharding.logical_to_spec(("nonsense",), rules)
    with pytest.raises(ValueError, match="unknown mesh axes \\['model'\\]"):
        sharding.logical_to_spec(("mlp",), [("mlp", "model")], mesh, (8,))


def test_fsdp_by_size_spec():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    assert sharding.fsdp_spec((3, 3, 64, 128), mesh, 1000) == P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((1000, 6), mesh, 1000) == P("fsdp", None)
    assert sharding.fsdp_spec((6, 1001), mesh, 1) == P()  # nothing divisible by 4
    assert sharding.fsdp_spec((64, 64), mesh, 10_000) == P()  # too small
    assert sharding.fsdp_spec((64, 64), sharding.make_mesh({"data": 8}), 1) == P()


@pytest.fixture(scope="module")
def abstract():
    with nnx.use_eager_sharding(False):
        return jax.eval_shape(init_state)


def test_param_shardings_annotations_and_size(abstract):
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    sh = sharding.param_shardings(abstract, mesh, min_size=MIN_SIZE)
    p = sh["params"]
    assert p["fc1"]["kernel"].get_value().spec == P("fsdp", "tensor")  # logical annotation
    assert p["fc2"]["kernel"].get_value().spec == P("tensor", "fsdp")
    assert p["conv_in"]["kernel"].get_value().spec == P(None, None, None, "fsdp")  # by size
    assert p["conv_in"]["bias"].get_value().spec == P()  # small: replicated
    # Adam moments shard like their parameters; scalars are replicated.
    mu = sh["opt"][0].mu
    assert mu["conv_in"]["kernel"].get_value().spec == P(None, None, None, "fsdp")
    assert sh["step"].spec == P() and sh["rng"].spec == P()


def test_annotated_params_fsdp_fill_and_errors():
    """Annotated params that leave "fsdp" unused get it on their largest free dim when big."""
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "mlp"))
    with nnx.use_eager_sharding(False):
        lin = nnx.eval_shape(lambda: nnx.Linear(48, 64, kernel_init=init, rngs=nnx.Rngs(0)))
    state = nnx.state(lin)
    fsdp_only = sharding.make_mesh({"fsdp": 8})
    spec = lambda sh: sh["kernel"].get_value().spec
    assert spec(sharding.param_shardings(state, fsdp_only, min_size=1)) == P(None, "fsdp")
    no_fill = sharding.param_shardings(state, fsdp_only, min_size=1, fsdp_fill=False)
    assert spec(no_fill) == P(None, None)
    assert spec(sharding.param_shardings(state, fsdp_only, min_size=10**6)) == P(None, None)
    tp = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    assert spec(sharding.param_shardings(state, tp, min_size=1)) == P("fsdp", "tensor")
    state["kernel"].set_metadata(out_sharding=("mlp",))
    with pytest.raises(ValueError, match="do not match param shape"):
        sharding.param_shardings(state, tp)


def test_mesh_context_sets_mesh_and_rules():
    from flax.core import spmd

    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    assert jax.sharding.get_abstract_mesh().empty
    with sharding.mesh_context(mesh):
        assert dict(jax.sharding.get_abstract_mesh().shape) == dict(mesh.shape)
        assert tuple(spmd.get_logical_axis_rules()) == sharding.DEFAULT_RULES
    assert jax.sharding.get_abstract_mesh().empty


def test_fsdp_shrinks_per_device_bytes():
    """A big param sharded by size takes 1/fsdp of the bytes per device; small ones do not."""

    def init():
        k = jax.random.key(0)
        return {"big": jax.random.normal(k, (256, 512)), "small": jnp.ones((16,))}

    with nnx.use_eager_sharding(False):
        total = sum(x.size * 4 for x in jax.tree.leaves(jax.eval_shape(init)))
    for fsdp in (1, 2, 4, 8):
        mesh = sharding.make_mesh({"data": -1, "fsdp": fsdp})
        state = sharding.shard_init(init, mesh, min_size=1024)
        per_dev = sharding.per_device_bytes(state)
        print(f"fsdp={fsdp}: total {total} B, per device {sorted(set(per_dev.values()))} B")
        assert set(per_dev.values()) == {256 * 512 * 4 // fsdp + 16 * 4}
        assert state["small"].sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(state["big"]), np.asarray(init()["big"]))


def test_make_global_batch_single_process():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    local = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "y": np.zeros(16)}
    batch = sharding.make_global_batch(local, mesh)
    assert batch["x"].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
    assert len(batch["x"].addressable_shards) == 8 and batch["x"].addressable_shards[
        0
    ].data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
    with pytest.raises(ValueError, match="not divisible by data\\*fsdp=8"):
        sharding.make_global_batch({"x": np.zeros((12, 3))}, mesh)


@pytest.fixture(scope="module")
def reference_run():
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    state, losses, _ = train(mesh, 5)
    return jax.tree.map(np.asarray, state["params"]), np.array(losses)


@pytest.mark.parametrize("shape", [{"data": 8}, {"fsdp": 8}, {"fsdp": 4, "tensor": 2}])
def test_sharded_training_matches_one_device(shape, reference_run):
    ref_params, ref_losses = reference_run
    mesh = sharding.make_mesh(shape)
    state, losses, shardings = train(mesh, 5)
    diff = float(np.max(np.abs(np.array(losses) - ref_losses)))
    pdiff = max(
        float(np.max(np.abs(np.asarray(a) - b)))
        for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_params))
    )
    per_dev = sharding.per_device_bytes(state["params"])
    full = sum(x.nbytes for x in jax.tree.leaves(ref_params))
    print(
        f"{shape}: losses {np.round(losses, 5)}, max |dloss| {diff:.2e}, max |dparam| {pdiff:.2e}"
    )
    print(f"{shape}: param bytes per device {max(per_dev.values())} of {full}")
    assert diff <= 1e-5 and pdiff <= 1e-5
    assert losses[-1] < losses[0]  # it actually trains
    # The output state keeps the requested layout (donation did not change shardings).
    for s, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        assert s.sharding.is_equivalent_to(want, s.ndim)
    if mesh.shape["fsdp"] > 1:
        assert max(per_dev.values()) < full / 2
