"""Device mesh, logical axis names and sharding rules: the only file that knows devices.

Model code names *logical* axes only (the short list in `LOGICAL_AXES`), e.g. a Linear kernel
annotated ``nnx.with_partitioning(init, ("embed", "mlp"))``. A config maps logical names onto
the three mesh axes ``("data", "fsdp", "tensor")`` with a list of rules
``[(logical, mesh_axis_or_axes_or_None), ...]`` (the t5x / big_vision convention). Parameters
without annotations (typical for conv nets) use FSDP-by-size: the largest dimension divisible by
the fsdp axis size is sharded over "fsdp" when the parameter is big enough, else the parameter
is replicated.

Training uses `jax.jit` with explicit in/out shardings (the pjit API); `shard_init` builds the
state directly in its sharded layout so no device ever holds the full model. Multi-host runs
call `initialize_distributed` first and build global batches from per-process shards with
`make_global_batch`.
"""

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis names used by model code (parameters and activations).
LOGICAL_AXES = {
    "batch": "examples in a batch",
    "length": "sequence positions (tokens or image patches)",
    "embed": "model width / residual stream (d_model)",
    "heads": "attention heads (or the fused heads*head_dim projection axis)",
    "kv": "per-head feature dimension (head_dim)",
    "mlp": "hidden units of an MLP / feed-forward block",
    "vocab": "token vocabulary (embedding tables, logits)",
    "conv_in": "input channels of a conv kernel",
    "conv_out": "output channels of a conv kernel",
    "height": "image height",
    "width": "image width",
    "channels": "activation channels of an image tensor (NHWC last axis)",
    "norm": "scale/bias vector of a normalization layer",
}

# Rules for the common case: batch over data x fsdp, weights' model dimension over fsdp
# (ZeRO-3 style), heads/mlp/vocab over tensor (Megatron style). A logical name may appear
# several times; the first entry whose mesh axes are still unused in the array wins.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("height", None),
    ("width", None),
    ("channels", None),
    ("norm", None),
)

# Parameters with fewer elements than this are replicated by FSDP-by-size (fp32: 256 KiB).
DEFAULT_MIN_SIZE = 2**16


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices=None) -> Mesh:
    """Builds a ("data", "fsdp", "tensor") mesh; one size may be -1 (= the remaining devices).

    `shape` is a dict such as {"data": -1, "fsdp": 2} (missing axes have size 1) or a
    3-tuple in MESH_AXES order.
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"Unknown mesh axes {sorted(unknown)}; valid axes: {MESH_AXES}")
        sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    else:
        sizes = [int(s) for s in shape]
        if len(sizes) != len(MESH_AXES):
            raise ValueError(f"Mesh shape {tuple(shape)} must have one size per axis {MESH_AXES}")
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"Mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n % known:
            raise ValueError(
                f"Mesh {dict(zip(MESH_AXES, sizes))}: {n} devices are not divisible by {known}"
            )
        sizes[sizes.index(-1)] = n // known
    if int(np.prod(sizes)) != n:
        raise ValueError(
            f"Mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
            f"but {n} are available"
        )
    return jax.make_mesh(
        tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(
    names: Sequence[str | None], rules=DEFAULT_RULES, mesh: Mesh | None = None, shape=None
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec with `rules`.

    Each mesh axis is used at most once per array (a later dim that wants an axis already taken
    falls through to its next rule or stays unsharded). With `mesh` and `shape`, a dim whose
    size is not divisible by its mesh axes is left unsharded, since jit needs even shards.
    """
    table: dict[str, list[tuple[str, ...]]] = {}
    valid = tuple(mesh.axis_names) if mesh is not None else MESH_AXES
    for logical, mesh_axes in rules:
        axes = _as_tuple(mesh_axes)
        if bad := [a for a in axes if a not in valid]:
            msg = f"Rule ({logical!r}, {mesh_axes!r}): unknown mesh axes {bad}; valid: {valid}"
            raise ValueError(msg)
        table.setdefault(logical, []).append(axes)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        choice = None
        if name is not None and name not in table:
            raise ValueError(f"Logical axis {name!r} has no rule; rules cover {sorted(table)}")
        for axes in table.get(name, []) if name is not None else []:
            if used & set(axes):
                continue
            if mesh is not None:
                axes = tuple(a for a in axes if mesh.shape[a] > 1)
                size = int(np.prod([mesh.shape[a] for a in axes]))
                if shape is not None and shape[i] % size:
                    continue
            choice = axes
            break
        used |= set(choice or ())
        spec.append(None if not choice else choice[0] if len(choice) == 1 else choice)
    return PartitionSpec(*spec)


def logical_to_sharding(names, mesh: Mesh, rules=DEFAULT_RULES, shape=None) -> NamedSharding:
    """NamedSharding for an array whose axes carry the logical `names` (see logical_to_spec)."""
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))


def fsdp_spec(shape: Sequence[int], mesh: Mesh, min_size: int = DEFAULT_MIN_SIZE):
    """FSDP-by-size: shard the largest dim divisible by the fsdp size over "fsdp", if the
    array has at least `min_size` elements; otherwise replicate (big_vision `fsdp` rule)."""
    n = mesh.shape["fsdp"]
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    # Largest first; ties go to the later dim (the output features of kernels).
    for i in sorted(range(len(shape)), key=lambda i: (shape[i], i), reverse=True):
        if shape[i] % n == 0:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def _fill_fsdp(spec: PartitionSpec, shape, mesh: Mesh, min_size: int) -> PartitionSpec:
    """Adds "fsdp" to the largest unsharded divisible dim of a big annotated param whose logical
    names did not use it (e.g. ("mlp", None) on an fsdp-only mesh), so FSDP covers it too."""
    n = mesh.shape["fsdp"]
    used = {a for entry in spec for a in _as_tuple(entry)}
    if n == 1 or "fsdp" in used or int(np.prod(shape, dtype=np.int64)) < min_size:
        return spec
    entries = list(spec) + [None] * (len(shape) - len(spec))
    free = [i for i in range(len(shape)) if entries[i] is None and shape[i] % n == 0]
    if free:
        entries[max(free, key=lambda i: (shape[i], i))] = "fsdp"
    return PartitionSpec(*entries)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(
    abstract_state,
    mesh: Mesh,
    rules=DEFAULT_RULES,
    min_size: int = DEFAULT_MIN_SIZE,
    fsdp_fill: bool = True,
):
    """Shardings (same pytree structure) for a state of arrays / ShapeDtypeStructs.

    Leaves inside an `nnx.Variable` carrying an ``out_sharding`` annotation of logical names
    (set by `nnx.with_partitioning` or `Variable.set_metadata`) follow `rules`; if that leaves
    the fsdp axis unused, a big param also gets "fsdp" on its largest free divisible dim
    (`fsdp_fill`). Every other array uses FSDP-by-size. Works for anything built from
    `nnx.split` states (params, EMA, optax states mirror the params' Variables and metadata,
    so moments shard like their parameters).
    """

    def leaf(x, names=None):
        shape = tuple(np.shape(x))
        if names is None:
            return NamedSharding(mesh, fsdp_spec(shape, mesh, min_size))
        if len(names) != len(shape):
            raise ValueError(f"Logical names {tuple(names)} do not match param shape {shape}")
        spec = logical_to_spec(names, rules, mesh, shape)
        if fsdp_fill:
            spec = _fill_fsdp(spec, shape, mesh, min_size)
        return NamedSharding(mesh, spec)

    def node(x):
        if _is_var(x):
            names = x.get_metadata().get("out_sharding")
            return jax.tree.map(lambda v: leaf(v, names), x)
        return leaf(x)

    return jax.tree.map(node, abstract_state, is_leaf=_is_var)


def shard_init(init_fn: Callable[[], Any], mesh: Mesh, shardings=None, **kw):
    """Runs `init_fn() -> state pytree` directly in its sharded layout.

    `jax.eval_shape` gives the structure; `jax.jit(init_fn, out_shardings=...)` lets XLA create
    each shard on its device, so no device ever holds the full model. `shardings` defaults to
    `param_shardings(abstract, mesh, **kw)`. Flax eager sharding is switched off while tracing:
    placement is decided here, not inside the modules.
    """
    with nnx.use_eager_sharding(False):
        if shardings is None:
            shardings = param_shardings(jax.eval_shape(init_fn), mesh, **kw)
        return jax.jit(init_fn, out_shardings=shardings)()


def abstract_state(init_fn: Callable[[], Any], mesh: Mesh, shardings=None, **kw):
    """ShapeDtypeStructs (with target shardings) of `init_fn()`; a restore target for orbax."""
    with nnx.use_eager_sharding(False):
        abstract = jax.eval_shape(init_fn)
    if shardings is None:
        shardings = param_shardings(abstract, mesh, **kw)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules=DEFAULT_RULES):
    """Mesh + logical rules for tracing model code, so activation constraints by logical
    name (e.g. `models.partitioning.constrain`) take effect; outside it they are no-ops."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(rules)):
        yield


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ("data", "fsdp"); all other axes replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def make_global_batch(local_batch, mesh: Mesh):
    """Global jax.Arrays from this process's slice of the batch (a pytree of numpy arrays).

    Each process passes the rows it loaded (its grain shard); the global batch is their
    concatenation in process order, sharded with `batch_sharding(mesh)`.
    """
    sharding = batch_sharding(mesh)
    n = mesh.shape["data"] * mesh.shape["fsdp"]

    def make(x):
        x = np.asarray(x)
        rows = x.shape[0] * jax.process_count() if x.ndim else 0
        if rows % n or rows == 0:
            raise ValueError(
                f"Global batch of {rows} rows ({x.shape[0] if x.ndim else 'scalar'} per process"
                f" x {jax.process_count()} processes) is not divisible by data*fsdp={n}"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(make, local_batch)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_collectives: str = "gloo",
    **kw,
) -> None:
    """`jax.distributed.initialize` for multi-controller runs; a no-op for one process.

    Must run before any other JAX call. CPU cross-process collectives use gloo.
    Extra keywords (e.g. initialization_timeout) go to `jax.distributed.initialize`.
    """
    if coordinator_address is None and num_processes in (None, 1):
        return
    if num_processes == 1:
        return
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        **kw,
    )


def per_device_bytes(tree) -> dict[int, int]:
    """Bytes of `tree`'s jax.Arrays held by each addressable device: {device id: bytes}."""
    out: dict[int, int] = {d.id: 0 for d in jax.local_devices()}
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            for shard in x.addressable_shards:
                out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return out


def describe_shardings(tree) -> str:
    """One line per array: path, shape and PartitionSpec (for logs and report.md)."""
    lines = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        spec = getattr(getattr(x, "sharding", None), "spec", None)
        lines.append(f"{jax.tree_util.keystr(path)} {tuple(np.shape(x))} {spec}")
    return "\n".join(lines)
