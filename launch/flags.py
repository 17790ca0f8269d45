"""Flags every launcher shares, and turning flags into a method's frozen config.

Launchers define their method's own flags with the same names as the fields of the method's
`Config` dataclass; `config_from_flags(Config)` then fills every field that has a flag set, so the
config's defaults stay the single source of defaults.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
from absl import flags, logging

from common import parallel

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory of the run: checkpoints, metrics, pictures.")
flags.DEFINE_integer("seed", None, "Seed of every random choice of the run.")
flags.DEFINE_string("dataset", None, "Dataset name.")
flags.DEFINE_string("data_dir", None, "Directory holding the dataset's raw files.")
flags.DEFINE_integer("batch_size", None, "Global batch size (over all devices and hosts).")
flags.DEFINE_integer("num_steps", None, "Train steps; a rerun with a larger value continues.")
flags.DEFINE_integer("checkpoint_every", None, "Save a checkpoint every this many steps.")
flags.DEFINE_integer("log_every", None, "Log metrics every this many steps.")
flags.DEFINE_bool("overwrite", False, "Delete a previous run of another config in --workdir.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for a multi-process run JAX cannot detect.")
flags.DEFINE_integer("num_processes", 1,
                     "Processes of a multi-process run (-1: let JAX detect the cluster).")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_integer("distributed_timeout", 60,
                     "Seconds to wait for all processes to join before failing.")
flags.mark_flag_as_required("workdir")


def parse_flagfile(path: str) -> None:
    """Parses the flags as `--flagfile=<path>` alone would set them (every other flag reset; the
    required --workdir a placeholder): how benchmarks and tests read a committed config."""
    FLAGS.unparse_flags()
    FLAGS([sys.argv[0] if sys.argv else "launch", f"--flagfile={path}", "--workdir=unused"])


def config_from_flags(config_cls):
    """An instance of `config_cls` with every field whose flag was given (non-None) set from it."""
    values = {}
    for field in dataclasses.fields(config_cls):
        if field.name in FLAGS and FLAGS[field.name].value is not None:
            values[field.name] = FLAGS[field.name].value
    return config_cls(**values)


class _LibraryChatter(logging.logging.Filter):
    """Drops the INFO lines Orbax writes on every save; keeps its warnings and errors."""

    def filter(self, record) -> bool:
        return record.levelno >= logging.logging.WARNING or "/orbax/" not in record.pathname


def setup() -> None:
    """Starts the multi-process runtime if asked, and records the flags in the workdir."""
    logging.get_absl_handler().addFilter(_LibraryChatter())
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id, FLAGS.distributed_timeout)
    logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s).", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.devices()[0].platform)
    if jax.process_index() == 0:
        os.makedirs(FLAGS.workdir, exist_ok=True)
        with open(os.path.join(FLAGS.workdir, "flags.txt"), "w") as f:
            f.write(FLAGS.flags_into_string())
