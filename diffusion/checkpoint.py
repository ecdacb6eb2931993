"""Thin wrapper around `orbax.checkpoint.CheckpointManager` for training runs.

A checkpoint step holds two items:
  "state": the train-state pytree (params, EMA params, optimizer state, step, RNG key), saved
           with `StandardSave` (sharded, async; every process writes its own shards);
  "data":  optional data-iterator state (what a grain iterator's `get_state()` returns: a
           JSON-able dict or bytes), one file per process because every process reads its own
           data shard.
Restoring takes an abstract target (ShapeDtypeStructs carrying the *new* shardings, e.g. from
`sharding.abstract_state`), so a run can resume on a different mesh. A latest step that is
partial (no commit marker) or unreadable is reported with a warning and the previous step is
used. Knows nothing of diffusion.
"""

import base64
import dataclasses
import json
import shutil
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

# Orbax writes this file into a step directory when the step is fully committed.
COMMIT_MARKER = "commit_success.txt"


class Restored(NamedTuple):
    step: int
    state: Any
    data_state: Any  # None when the checkpoint has no data item


# --- per-process data-iterator state ----------------------------------------------------------


class _DataStateHandler(ocp.CheckpointHandler):
    """Writes/reads `process_{i}-of-{n}.json`, like grain's own orbax handler, but returns the
    state instead of mutating an iterator so this file needs no grain import."""

    def _file(self, directory) -> epath.Path:
        return (
            epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        )

    def save(self, directory, args: "DataStateSave"):
        state = args.state
        if isinstance(state, bytes):
            record = {"type": "bytes", "value": base64.b64encode(state).decode("ascii")}
        else:
            record = {"type": "json", "value": state}
        self._file(directory).write_text(json.dumps(record))

    def restore(self, directory, args: "DataStateRestore" = None):
        path = self._file(directory)
        if not path.exists():  # e.g. resumed with another process count: data starts afresh
            found = sorted(p.name for p in epath.Path(directory).glob("process_*.json"))
            msg = f"No data-iterator state {path.name} (found {found}); returning None"
            warnings.warn(msg, stacklevel=2)
            return None
        record = json.loads(path.read_text())
        if record["type"] == "bytes":
            return base64.b64decode(record["value"])
        return record["value"]

    def metadata(self, directory):
        return None

    def structure(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(_DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(_DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# --- the manager wrapper ----------------------------------------------------------------------


def _abstract(tree, shardings=None):
    """ShapeDtypeStructs for `tree` (arrays or ShapeDtypeStructs), with `shardings` if given,
    else each leaf's own sharding."""
    if shardings is not None:
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings
        )
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


class Checkpointer:
    """Keep-N (optionally best-N by a metric), async, multi-process-safe checkpoints.

    Usage:
        ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3)
        ckpt.save(step, state, data_state=it.get_state(), metrics={"loss": l})
        step, state, data_state = ckpt.restore(abstract_state=abstract)  # latest good step
        ckpt.close()
    """

    def __init__(
        self,
        directory,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        best_metric: str | None = None,
        best_mode: str = "min",
        async_save: bool = True,
    ):
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = epath.Path(directory)
        best_fn = None
        if best_metric is not None:
            best_fn = lambda metrics: float(metrics[best_metric])
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            best_fn=best_fn,
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self.best_metric = best_metric

    def save(self, step: int, state, *, data_state=None, metrics=None, force=False) -> bool:
        """Starts saving `state` (and the data-iterator state); returns whether it saved.

        Async: returns once the arrays are copied off the devices, so the caller may donate
        or overwrite `state` right away. With `best_metric`, `metrics` must contain it.
        """
        items = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            items["data"] = DataStateSave(data_state)
        if self.best_metric is not None and (metrics is None or self.best_metric not in metrics):
            raise ValueError(
                f"best_metric {self.best_metric!r} missing from metrics {sorted(metrics or {})}"
            )
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        return self._manager.save(
            int(step), args=ocp.args.Composite(**items), metrics=metrics, force=force
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Newest saved step (not checked for corruption; `restore()` is)."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        return self._manager.best_step()

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def missing_parts(self, step: int) -> list[str]:
        """What a committed step should hold but does not (empty when complete)."""
        path = self.step_dir(step)
        return [name for name in (COMMIT_MARKER, "state") if not (path / name).exists()]

    def check_compatible(self, abstract_state) -> None:
        """Fail naming the first mismatched array if the newest readable step was saved from
        another structure (e.g. another model config); partial or unreadable steps are left to
        `restore`'s fallback. Keys under params/ are compared first: they name the module."""
        for step in reversed(self.all_steps()):
            if self.missing_parts(step):
                continue
            try:
                meta = ocp.StandardCheckpointer().metadata(self.step_dir(step) / "state")
            except Exception:  # unreadable: restore() reports it and falls back
                continue
            meta = meta.item_metadata
            have = _shapes_by_path(meta.tree if hasattr(meta, "tree") else meta)
            want = _shapes_by_path(abstract_state)
            for key in sorted(
                set(want) | set(have), key=lambda k: (not k.startswith("params/"), k)
            ):
                if want.get(key) != have.get(key):
                    raise ValueError(
                        f"checkpoint step {step} in {self.directory} does not match this model "
                        f"config: parameter {key} has shape {have.get(key, 'missing')} in the "
                        f"checkpoint, {want.get(key, 'missing')} in the model"
                    )
            return

    def restore(
        self, step: int | None = None, abstract_state=None, shardings=None, quarantine_bad=False
    ) -> Restored:
        """Restores `step` (default: the latest step that can be read).

        `abstract_state`: pytree of arrays / ShapeDtypeStructs with the wanted structure; the
        restored arrays get `shardings` (same structure) or the leaves' own shardings, so the
        run may resume on another mesh. Without it, arrays come back as saved, unsharded.
        With step=None, a partial or unreadable step is reported with a warning and the
        previous one is tried; an explicitly requested step raises instead. `quarantine_bad`
        moves the skipped steps aside (see `quarantine`) so a resumed run can save them again.
        """
        self.wait_until_finished()
        target = None if abstract_state is None else _abstract(abstract_state, shardings)
        candidates = [int(step)] if step is not None else self.all_steps()[::-1]
        if not candidates:
            raise FileNotFoundError(f"No checkpoints in {self.directory}")
        bad = []
        for s in candidates:
            try:
                if missing := self.missing_parts(s):
                    raise ValueError(f"{self.step_dir(s)} is partial: missing {missing}")
                restored = self._restore_step(s, target)
            except Exception as e:  # orbax/tensorstore raise many types for bad files
                if step is not None:
                    raise
                bad.append(s)
                warnings.warn(
                    f"Checkpoint step {s} in {self.directory} is corrupt or partial, "
                    f"falling back to the previous step: {type(e).__name__}: {str(e)[:300]}",
                    stacklevel=2,
                )
                continue
            for b in bad if quarantine_bad else []:
                self.quarantine(b)
            return restored
        raise RuntimeError(f"No readable checkpoint in {self.directory} (tried {candidates})")

    def _restore_step(self, step: int, target) -> Restored:
        items = {"state": ocp.args.StandardRestore(target)}
        has_data = (self.step_dir(step) / "data").exists()
        if has_data:
            items["data"] = DataStateRestore()
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        return Restored(step, out["state"], out["data"] if has_data else None)

    def quarantine(self, step: int) -> None:
        """Moves a bad step out of the way (to `<dir>/corrupt/<step>[.n]`) so that it is not
        listed and the run can save that step number again. Process 0 moves it."""
        if jax.process_index() == 0:
            dest = self.directory / "corrupt"
            dest.mkdir(exist_ok=True)
            name, n = str(step), 1
            while (dest / name).exists():  # the same step may go bad twice
                name, n = f"{step}.{n}", n + 1
            shutil.move(str(self.step_dir(step)), str(dest / name))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint_quarantine_{step}")
        self._manager.reload()

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _shapes_by_path(tree) -> dict[str, tuple]:
    """{'params/down_blocks/0/...': shape}, ignoring NNX's `.value` wrapper in key paths."""

    def name(k):
        return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))

    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        keys = [name(k) for k in path if name(k) != "value"]
        out["/".join(keys)] = tuple(x.shape)
    return out
