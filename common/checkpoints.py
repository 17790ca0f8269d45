"""Checkpoints in a workdir: Orbax's CheckpointManager, with the run's configuration and
checksums stored in every checkpoint.

    <workdir>/checkpoints/<step>/state   the state (Orbax, written atomically and asynchronously)
    <workdir>/checkpoints/<step>/meta    JSON: the run's config and a checksum of every array
    <workdir>/checkpoints/<step>.damaged a checkpoint that failed to restore or verify, kept aside
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from common import metrics, parallel, workdirs


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names the workdir and what to do."""


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as a flat uint32 vector (8-byte types as two words, smaller ones widened)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).ravel()
    if x.dtype.itemsize < 4:
        unsigned = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()
    return jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()


def _mix(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 that spreads every input bit."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


@jax.jit
def _checksums(leaves: list[jax.Array]) -> jax.Array:
    """Per leaf: Σ_i mix(word_i ^ mix(i)) mod 2^32. `mix` is a bijection, so a change of any one
    word changes the sum (of several, all but surely); it runs where the arrays are, sharded or
    not."""
    sums = []
    for x in leaves:
        words = _words(x)
        position = _mix(jnp.arange(words.size, dtype=jnp.uint32))
        sums.append(jnp.sum(_mix(words ^ position), dtype=jnp.uint32))
    return jnp.stack(sums) if sums else jnp.zeros((0,), jnp.uint32)


def checksums(state: Any) -> list[int]:
    """One 32-bit checksum of the bits of every array of `state` (same on every process)."""
    return [int(c) for c in parallel.to_host(_checksums(jax.tree.leaves(state)))]


class Checkpoints:
    """Saves a pytree every `save_every` steps (and when forced), keeps the last `max_to_keep`,
    and restores the newest intact one.

    Each checkpoint holds the state and a small JSON item: the run's `config` (see
    `common.workdirs.claim`) and a checksum of every array, written at save time and checked at
    restore, so changed bytes are detected even when the files still parse. A checkpoint that fails
    to restore or to verify is moved aside to `<step>.damaged` and the one before it is used.

    Use it as a context manager: leaving the block, also through an exception, waits for the
    asynchronous saves in flight to be finalised, so a crash never loses a checkpoint it reported.
    """

    def __init__(self, workdir: str, save_every: int, config: Any = None, max_to_keep: int = 3):
        self.workdir = workdir
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.config = config
        self.last_good: int | None = None  # the newest step saved or verified by this run
        self.restored_config: Any = None  # the config saved with the checkpoint restored
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                 save_interval_steps=save_every, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether `save(step, ...)` without `force` would save (every `save_every` steps)."""
        return self.manager.should_save(step)

    def save(self, step: int, state: Any, force: bool = False) -> bool:
        """Starts saving `state` as checkpoint `step` (asynchronously); `CheckpointError` with one
        line if the disk cannot hold it or an earlier save failed."""
        if not force and not self.manager.should_save(step):
            return False
        self._check_space(step, state)
        meta = {"config": self.config, "checksums": checksums(state)}
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
        except Exception as e:  # noqa: BLE001 -- Orbax and TensorStore raise many types
            raise self._failure(step, e) from None
        if saved:
            self.last_good = step
        return saved

    def _check_space(self, step: int, state: Any) -> None:
        need = int(sum(x.nbytes for x in jax.tree.leaves(state)) * 1.1) + (1 << 20)
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise CheckpointError(
                f"Disk full: {free:,} bytes free for {self.directory}, the checkpoint of step "
                f"{step} needs about {need:,}; {self._intact()}. Free some space and rerun the "
                "same command.")

    def _intact(self) -> str:
        return (f"the checkpoint of step {self.last_good} is intact" if self.last_good
                else "no checkpoint was written")

    def _failure(self, step: int, error: Exception) -> CheckpointError:
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        free = shutil.disk_usage(self.directory).free
        return CheckpointError(
            f"Saving the checkpoint of step {step} in {self.directory} failed "
            f"({type(error).__name__}: {first}); {free:,} bytes free there; {self._intact()}.")

    def restore_latest(self, target: Any) -> tuple[Any, int]:
        """Returns (state, step) of the newest intact checkpoint, or (target, 0) if none.

        `target` gives the structure, dtypes and shardings. A checkpoint that fails to restore or
        whose arrays do not match their checksums is moved aside (one log line) and skipped.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
                problem = None
                if checksums(restored["state"]) != restored["meta"]["checksums"]:
                    problem = "its arrays do not match the checksums written when it was saved"
            except Exception as e:  # noqa: BLE001 -- Orbax raises several types for damaged files
                text = str(e).strip()
                text = text.splitlines()[0].split(" See full")[0][:200] if text else ""
                problem = f"unreadable: {type(e).__name__}: {text}"
            if problem is None:
                self.last_good = step
                self.restored_config = restored["meta"].get("config")
                return restored["state"], step
            self._move_aside(step, problem)
        return target, 0

    def _move_aside(self, step: int, problem: str) -> None:
        path = os.path.join(self.directory, str(step))
        aside = path + ".damaged"
        if jax.process_index() == 0:
            suffix = 1
            while os.path.exists(aside):
                aside, suffix = f"{path}.damaged.{suffix}", suffix + 1
            os.rename(path, aside)
            logging.error("Checkpoint %s is damaged (%s); moved it to %s and trying the one "
                          "before it.", path, problem, aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        self.manager.reload()

    def stop_if_preempted(self, step: int, state: Any) -> None:
        """After a step: if SIGTERM or SIGINT arrived (`common.workdirs.claim`; process 0's word
        on every process), saves `state` (unless None) as checkpoint `step` and raises
        `Preempted`."""
        signum = workdirs.preemption_requested()
        if not parallel.agree(signum is not None):
            return
        if state is not None and self.last_good != step:
            self.save(step, state, force=True)
        self.manager.wait_until_finished()
        raise workdirs.Preempted(step, signum or signal.SIGTERM)

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._failure(self.manager.latest_step() or 0, e) from None
        finally:
            self.manager.close()

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@contextlib.contextmanager
def resume(workdir: str, checkpoint_every: int, config: Any, state: Any, log_every: int
           ) -> Iterator[tuple[Checkpoints, Any, int, metrics.MetricWriter]]:
    """How every training loop starts: (checkpoints, the state restored from the newest intact
    checkpoint or `state`, its step or 0, a metrics writer resumed at that step), all closed when
    the block ends. The rows before the checkpoint are checked against the `log_every` saved with
    it (the interval they were logged at), not today's."""
    with Checkpoints(workdir, checkpoint_every, config) as ckpts:
        state, start_step = ckpts.restore_latest(state)
        if start_step:
            logging.info("Resumed from the checkpoint of step %d.", start_step)
        saved = ckpts.restored_config
        logged_every = saved.get("log_every", log_every) if isinstance(saved, dict) else log_every
        writer = metrics.MetricWriter(workdir, resume_step=start_step, log_every=logged_every)
        try:
            yield ckpts, state, start_step, writer
        finally:
            writer.close()


def out_of_time(start_time: float, max_minutes: float, done: int, num_steps: int,
                step_name: str = "step") -> bool:
    """At a checkpoint: whether a run with steps left should stop because `max_minutes` (0: no
    limit) have passed since `start_time` (`time.monotonic()`; every process agrees, process 0's
    clock deciding). Logs the stop; the same command continues from that checkpoint."""
    if not (max_minutes and done < num_steps and parallel.agree(
            workdirs.out_of_time(start_time, max_minutes, time.monotonic()))):
        return False
    logging.info("Stopping after %s %d of %d: --max_minutes=%g has passed; the same command "
                 "continues from this checkpoint.", step_name, done, num_steps, max_minutes)
    return True
