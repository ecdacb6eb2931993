"""Read PyTorch state-dict files (`torch.save`) without torch, safely; and safetensors.

`read_state_dict(path) -> {name: numpy array}` reads
  - torch's zip format (torch >= 1.6 default): a zip holding `<archive>/data.pkl` and one raw
    little-endian file per storage, `<archive>/data/<key>`;
  - torch's legacy format (`_use_new_zipfile_serialization=False`, e.g. pytorch-fid's
    pt_inception-2015-12-05-6726825d.pth): pickled magic number, protocol version and sys_info,
    then the object pickle, then the sorted storage keys, then per storage an int64 element
    count followed by its raw bytes;
  - safetensors files (by extension).
The pickles are read by a restricted Unpickler that resolves only the globals a state dict
needs (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, `torch.<Type>Storage`) and
refuses everything else, like torch's own `weights_only=True` loader, so a file cannot run code.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclasses.dataclass
class _Storage:
    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclasses.dataclass
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    """Stand-in for torch._utils._rebuild_tensor_v2 (extra args: requires_grad, hooks, ...)."""
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: only state dicts of tensors are read"
        )

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        dtype, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(dtype, np.dtype):
            raise pickle.UnpicklingError(f"storage {key} has no tensor dtype")
        if key not in self.storages:
            self.storages[key] = _Storage(key, dtype, numel)
        return self.storages[key]


def _materialise(obj, path: str):
    """Replace tensor references by numpy arrays (copies), recursively through containers."""
    if isinstance(obj, _TensorRef):
        s, itemsize = obj.storage, obj.storage.dtype.itemsize
        last = obj.offset + sum((n - 1) * st for n, st in zip(obj.size, obj.stride) if n > 0)
        if any(n == 0 for n in obj.size):
            return np.zeros(obj.size, s.dtype)
        if obj.offset < 0 or min(obj.stride, default=0) < 0 or last >= s.data.size:
            raise ValueError(f"{path}: tensor view outside its storage {s.key}")
        view = np.lib.stride_tricks.as_strided(
            s.data[obj.offset :], obj.size, [st * itemsize for st in obj.stride], writeable=False
        )
        return np.array(view)
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v, path)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_materialise(v, path) for v in obj)
    return obj


def _read_zip(path: str):
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise ValueError(f"{path}: a zip file without exactly one data.pkl is not a torch file")
        prefix = pkl[0][: -len("data.pkl")]
        with zf.open(pkl[0]) as f:
            unpickler = _Unpickler(f)
            obj = unpickler.load()
        for s in unpickler.storages.values():
            raw = zf.read(f"{prefix}data/{s.key}")
            s.data = np.frombuffer(raw, s.dtype, count=s.numel)
    return obj


def _read_legacy(path: str):
    with open(path, "rb") as f:
        if _Unpickler(f).load() != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a torch file (bad magic number)")
        _Unpickler(f).load()  # protocol version
        sys_info = _Unpickler(f).load()
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian torch files are not supported")
        unpickler = _Unpickler(f)
        obj = unpickler.load()
        for key in _Unpickler(f).load():  # storages follow in this order
            s = unpickler.storages[str(key)]
            numel = int(np.frombuffer(f.read(8), "<i8")[0])
            raw = f.read(numel * s.dtype.itemsize)
            if numel != s.numel or len(raw) != numel * s.dtype.itemsize:
                raise ValueError(f"{path}: storage {key} is truncated or inconsistent")
            s.data = np.frombuffer(raw, s.dtype)
    return obj


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """{name: numpy array} from a torch .pth/.pt/.bin file (zip or legacy) or a .safetensors."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    try:
        obj = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    except (pickle.UnpicklingError, EOFError, KeyError, IndexError) as e:
        raise ValueError(f"{path}: cannot read as a torch state dict ({e})") from e
    obj = _materialise(obj, path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a flat dict of tensors")
    return dict(obj)
