"""Train from a config; resumes automatically when the workdir holds checkpoints.

    python -m experiments.train --config configs/digits_unet_eps.py[:runlocal] --workdir DIR

Multi-process (one process per host): add --coordinator HOST:PORT --num_processes N
--process_id I (CPU collectives use gloo).
"""

from absl import app, flags
from ml_collections import config_flags

from diffusion import sharding, train


def main(argv):
    del argv
    sharding.initialize_distributed(
        flags.FLAGS.coordinator, flags.FLAGS.num_processes, flags.FLAGS.process_id
    )
    train.train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    # Flags are defined only when run as a script, so experiments modules import together.
    config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:variants]")
    flags.DEFINE_string("workdir", None, "output directory (resumed if it has checkpoints)")
    flags.DEFINE_string("coordinator", None, "multi-process coordinator address host:port")
    flags.DEFINE_integer("num_processes", None, "number of processes")
    flags.DEFINE_integer("process_id", None, "this process's index")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
