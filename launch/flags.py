"""Flags every launcher shares, and a method's flags generated from its config dataclass.

`define_config_flags(Config)` defines one flag per field (nested sub-configs prefixed with their
field's name), with help from the class docstring; `config_from_flags(Config)` then fills every
field whose flag was given, so the config's defaults stay the single source of defaults.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import sys
import types
import typing
from typing import Any, Callable, Sequence

import jax
from absl import flags, logging

from common import checkpoints, data, parallel
from common import config as config_lib
from common import workdirs

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory of the run: checkpoints, metrics, pictures.")
flags.DEFINE_bool("overwrite", False, "Delete a previous run of another config in --workdir.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for a multi-process run JAX cannot detect.")
flags.DEFINE_integer("num_processes", 1,
                     "Processes of a multi-process run (-1: let JAX detect the cluster).")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_integer("distributed_timeout", 60,
                     "Seconds to wait for all processes to join before failing.")
flags.mark_flag_as_required("workdir")


def parse_flagfile(path: str, extra_flags: Sequence[str] = ()) -> None:
    """Parses the flags as `--flagfile=<path>` followed by `extra_flags` would set them (every
    other flag reset; the required --workdir a placeholder): how benchmarks and tests read a
    committed config."""
    FLAGS.unparse_flags()
    FLAGS([sys.argv[0] if sys.argv else "launch", f"--flagfile={path}", *extra_flags,
           "--workdir=unused"])


_SCALAR_FLAGS = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
                 float: flags.DEFINE_float, str: flags.DEFINE_string}
_MULTI_FLAGS = {int: flags.DEFINE_multi_integer, float: flags.DEFINE_multi_float,
                str: flags.DEFINE_multi_string}


def _value_type(annotation) -> tuple[type, bool]:
    """(element type, is a sequence) of a field annotation such as `int | None` or
    `tuple[int, ...]`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (tuple, list, collections.abc.Sequence):
        return args[0], True
    if args and origin in (typing.Union, types.UnionType):
        return _value_type(args[0])
    return annotation, False


def define_config_flags(config_cls: type, prefix: str = "", defaults=None) -> None:
    """Defines one flag per field of `config_cls`, named `<prefix><field>`; a nested config's
    fields get the prefix `<field>_`. Help comes from the field's `Attributes:` entry, the default
    from the dataclass or `defaults` (shown in the help; the flag itself defaults to None, "not
    given"). A field declared with `common.config.choice` becomes an enum flag; a tuple field a
    repeatable flag."""
    hints = typing.get_type_hints(config_cls)
    docs = config_lib.field_docs(config_cls)
    defaults = config_cls() if defaults is None else defaults
    for field in dataclasses.fields(config_cls):
        name = prefix + field.name
        default = getattr(defaults, field.name)
        if dataclasses.is_dataclass(default):
            define_config_flags(type(default), name + "_", default)
            continue
        if field.name not in docs:
            raise TypeError(f"{config_cls.__name__}.{field.name} has no entry in the class "
                            "docstring's Attributes: section (its flag's help).")
        kind, is_sequence = _value_type(hints[field.name])
        shown = list(default) if is_sequence else default
        help_text = f"{docs[field.name]} (default: {shown})"
        choices = field.metadata.get("choices")
        if choices is not None and kind is str:
            define = flags.DEFINE_multi_enum if is_sequence else flags.DEFINE_enum
            define(name, None, list(choices), help_text)
        elif is_sequence:
            _MULTI_FLAGS[kind](name, None, help_text)
        else:
            _SCALAR_FLAGS[kind](name, None, help_text)


def config_from_flags(config_cls: type, prefix: str = ""):
    """`config_cls()` with every field whose flag was given (non-None) set from it."""
    return _override(config_cls(), prefix)


def _override(config, prefix: str):
    values = {}
    for field in dataclasses.fields(config):
        name, current = prefix + field.name, getattr(config, field.name)
        if dataclasses.is_dataclass(current):
            values[field.name] = _override(current, name + "_")
        elif FLAGS[name].value is not None:
            value = FLAGS[name].value
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(config, **values)


class _LibraryChatter(logging.logging.Filter):
    """Drops the INFO lines Orbax writes on every save; keeps its warnings and errors."""

    def filter(self, record) -> bool:
        return record.levelno >= logging.logging.WARNING or "/orbax/" not in record.pathname


def setup() -> None:
    """Starts the multi-process runtime if asked."""
    logging.get_absl_handler().addFilter(_LibraryChatter())
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id, FLAGS.distributed_timeout)
    logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s).", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.devices()[0].platform)


# Errors that are about the user's input or the run's files: one line, exit status 1.
USER_ERRORS = (workdirs.WorkdirError, checkpoints.CheckpointError, FloatingPointError,
               FileNotFoundError, data.CorruptDataError)


def run(train_and_evaluate: Callable[..., Any], config) -> None:
    """Runs `train_and_evaluate(config, --workdir, --overwrite)` as a launcher does: the
    multi-process set-up, `flags.txt` written into the workdir once the run is accepted, and the
    errors a user can act on (bad config, workdir in use or of another run, damaged or full disk,
    non-finite values, missing data) as one line and a non-zero exit; a preempted run exits with
    128 + the signal's number after saving its checkpoint."""
    try:
        config.validate()
    except ValueError as e:
        raise SystemExit(f"Error: {e}") from None
    setup()
    token = workdirs.RECORDS.set({"flags.txt": FLAGS.flags_into_string()})
    try:
        train_and_evaluate(config, FLAGS.workdir, FLAGS.overwrite)
    except workdirs.Preempted as e:
        logging.warning("%s", e)
        sys.exit(128 + e.signum)
    except USER_ERRORS as e:
        raise SystemExit(f"Error: {e}") from None
    finally:
        workdirs.RECORDS.reset(token)
