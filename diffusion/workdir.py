"""The workdir every entry point writes (DESIGN.md section 2): config.json, metrics.jsonl (one JSON
object per logged step or result), report.md (tables a person reads), PNG figures, checkpoints/."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import ml_collections


def _jsonable(x):
    if hasattr(x, "to_dict"):  # ml_collections.ConfigDict
        return x.to_dict()
    if hasattr(x, "tolist"):  # numpy / jax arrays and scalars
        return x.tolist()
    return str(x)


def as_json(config) -> dict:
    """A config as its config.json holds it (what an existing workdir's file compares to)."""
    return json.loads(json.dumps(config, default=_jsonable, sort_keys=True))


class Workdir:
    def __init__(self, path: str, config=None):
        self.path = os.path.abspath(path)
        os.makedirs(self.path, exist_ok=True)
        if config is not None:
            with open(self.file("config.json"), "w") as f:
                json.dump(config, f, indent=2, default=_jsonable, sort_keys=True)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def log(self, **record):
        """Append one JSON object (with a wall-clock stamp) to metrics.jsonl."""
        record = {"time": round(time.time(), 3), **record}
        with open(self.file("metrics.jsonl"), "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")

    def write_report(self, text: str):
        with open(self.file("report.md"), "w") as f:
            f.write(text)


def markdown_table(rows: list[dict], columns: list[str], floatfmt: str = ".3g") -> str:
    """A GitHub-markdown table of rows (dicts) restricted to columns; floats formatted."""

    def fmt(v):
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run wrote to its workdir's config.json."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} holds no config.json: not a workdir of a training run")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def check_new_folder(path: str, label: str = "") -> None:
    """Refuse a write_new_folder target that exists and is not an empty folder (`label` names
    it in the error, e.g. "export target "); callers check before any long work."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{label}{path} exists and is not empty; choose a new folder")


def write_new_folder(path: str, write) -> str:
    """`write(tmp)` fills a new folder beside `path` (with a plain folder's permissions), which
    is then renamed to `path` (absent or empty: check_new_folder), so nothing is left
    half-written; on any error the partial folder is removed. Returns path."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".writing-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 -> what os.makedirs would give
    try:
        write(tmp)
        if os.path.isdir(path):
            os.rmdir(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
