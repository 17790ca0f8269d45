"""Checkpoints in a workdir: Orbax's CheckpointManager, plus the guard that a workdir belongs to one
configuration.

Layout of a workdir:
    config.json          the configuration the run was started with (guarded by `claim_workdir`)
    checkpoints/<step>/  Orbax checkpoints, the last `max_to_keep` kept, written atomically
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterable

import jax
import orbax.checkpoint as ocp
from absl import logging

CONFIG_FILE = "config.json"


class WorkdirConflictError(RuntimeError):
    """The workdir holds a run of a different configuration."""


def claim_workdir(workdir: str, config: dict[str, Any], overwrite: bool = False,
                  resumable_keys: Iterable[str] = (), defaults: dict[str, Any] | None = None
                  ) -> None:
    """Makes `workdir` this run's, or refuses.

    A fresh workdir gets `config.json`. An existing one is accepted when its configuration equals
    `config` in every key except `resumable_keys` (e.g. `num_steps`, which a rerun may extend);
    a key its stored configuration lacks (written before the key existed) counts as its value in
    `defaults`.
    Otherwise `WorkdirConflictError` names the differing keys, unless `overwrite` is set, in which
    case the old run's contents are deleted first.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    config = json.loads(json.dumps(config))  # normalise tuples to lists, as stored
    if os.path.exists(path):
        with open(path) as f:
            old = {**json.loads(json.dumps(defaults or {})), **json.load(f)}
        ignored = set(resumable_keys)
        diff = sorted(k for k in set(old) | set(config)
                      if k not in ignored and old.get(k) != config.get(k))
        if diff and not overwrite:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff)
            raise WorkdirConflictError(
                f"{workdir} holds a run with a different configuration ({details}). Use another "
                "--workdir, or pass --overwrite to delete that run and start afresh.")
        if diff and overwrite and jax.process_index() == 0:
            logging.warning("--overwrite: deleting the previous run in %s", workdir)
            shutil.rmtree(workdir)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        os.replace(tmp, path)


class Checkpoints:
    """Saves a pytree every `save_every` steps (and when forced), keeps the last `max_to_keep`,
    and restores the latest readable one.

    Use it as a context manager: leaving the block, also through an exception, waits for the
    asynchronous saves in flight to be finalised, so a crash never loses a checkpoint it reported.
    """

    def __init__(self, workdir: str, save_every: int, max_to_keep: int = 3):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                 save_interval_steps=save_every, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def restore_latest(self, target: Any) -> tuple[Any, int]:
        """Returns (state, step) of the newest readable checkpoint, or (target, 0) if none.

        `target` gives the structure, dtypes and shardings. A checkpoint that fails to restore is
        reported by path and skipped for the one before it.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
                return state, step
            except Exception as e:  # orbax raises several types for damaged files
                logging.error("Checkpoint %s is unreadable (%s: %s); trying the previous one.",
                              os.path.join(self.directory, str(step)), type(e).__name__, e)
        return target, 0

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
