"""Convert pytorch-fid's Inception weights (torch .pth) to safetensors, torch not needed.

  python -m tools.convert_inception pt_inception-2015-12-05-6726825d.pth pt_inception.safetensors

Reads the torch file (legacy or zip format) with the restricted reader of
diffusion/metrics/torch_files.py, checks it is the FID network tensor by tensor, and writes the
same torch-named tensors (without BatchNorm's `num_batches_tracked` counters) to safetensors;
`metrics.inception.load` reads either file. The written file is read back and compared exactly.
The source file's SHA-256 goes into the safetensors metadata, so a conversion can be traced to
the published file (whose name carries the first 8 hex digits of its SHA-256: 6726825d).
"""

from __future__ import annotations

import argparse
import hashlib

import numpy as np

from diffusion.metrics import inception
from diffusion.metrics.torch_files import read_state_dict


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert(src: str, dst: str) -> dict[str, np.ndarray]:
    """Write the FID Inception weights of `src` to safetensors `dst`; returns the tensors."""
    from safetensors.numpy import load_file, save_file

    state = read_state_dict(src)
    inception.from_state_dict(state, src)  # raises StateDictError if it is not the FID network
    tensors = {
        k: np.ascontiguousarray(v)
        for k, v in state.items()
        if not k.endswith(".num_batches_tracked")
    }
    save_file(tensors, dst, metadata={"source": src, "source_sha256": sha256(src)})
    back = load_file(dst)
    if set(back) != set(tensors) or any(not np.array_equal(back[k], v) for k, v in tensors.items()):
        raise RuntimeError(f"{dst} does not read back equal to {src}")
    return tensors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="pt_inception-2015-12-05-6726825d.pth (torch state dict)")
    parser.add_argument("dst", help="output .safetensors")
    args = parser.parse_args(argv)
    tensors = convert(args.src, args.dst)
    n = sum(v.size for v in tensors.values())
    print(f"wrote {args.dst}: {len(tensors)} tensors, {n / 1e6:.2f} M values")


if __name__ == "__main__":
    main()
