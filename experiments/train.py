"""Train from a config; resumes automatically when the workdir holds checkpoints.

    python -m experiments.train --config configs/digits_unet_eps.py[:runlocal] --workdir DIR

Multi-process (one process per host): add --coordinator HOST:PORT --num_processes N
--process_id I (CPU collectives use gloo).
"""

from absl import app, flags
from ml_collections import config_flags

from diffusion import sharding, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:variants]")
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (resumed if it has checkpoints)")
_COORD = flags.DEFINE_string("coordinator", None, "multi-process coordinator address host:port")
_NPROC = flags.DEFINE_integer("num_processes", None, "number of processes")
_PID = flags.DEFINE_integer("process_id", None, "this process's index")


def main(argv):
    del argv
    sharding.initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
    train.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
