"""A run's workdir: one writer at a time, the configuration it belongs to, and preemption.

    <workdir>/run.lock      the running process (pid, host), held for the whole run
    <workdir>/config.json   the configuration of the run (also stored in every checkpoint)
    <workdir>/flags.txt     the launcher's flags, written once the run is accepted

`claim` makes a workdir this run's for the duration of a `with` block, or refuses with one line
(`WorkdirError`): another live process holds it, it holds a run of another configuration (read
from config.json and from the newest checkpoint, so deleting or editing config.json cannot change
it), or it is not a directory. Inside the block SIGTERM and SIGINT only set a flag: the training
loops save a checkpoint at the next step boundary and raise `Preempted`.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import os
import shutil
import signal
import socket
import threading
from typing import Any, Iterable, Iterator, Mapping

import jax
from absl import logging
from flax.traverse_util import flatten_dict

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"

# Files a launcher asks to be written into the workdir once a run is accepted ({name: text}).
RECORDS: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("records", default={})

_preemption_signal: int | None = None


class WorkdirError(RuntimeError):
    """The workdir cannot be used by this run; the message says why and what to do."""


class WorkdirConflictError(WorkdirError):
    """The workdir holds a run of a different configuration."""


class Preempted(Exception):
    """The run was asked to stop (SIGTERM or SIGINT) and saved a checkpoint at `step`."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum
        super().__init__(f"Stopped by {signal.Signals(signum).name} after saving the checkpoint "
                         f"of step {step}; the same command continues the run.")


def flatten(config: Mapping[str, Any]) -> dict[str, Any]:
    """A nested config dict with flag-style keys: {"eval": {"every": 1}} -> {"eval_every": 1}."""
    return flatten_dict(json.loads(json.dumps(config)), sep="_")


def read_json(path: str) -> Any:
    """The JSON in `path`, or `WorkdirError` naming the file when it is not valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise WorkdirError(f"{path} is not valid JSON ({e}); it was damaged or truncated. Restore "
                           "or delete it (a run's configuration is also stored in its "
                           "checkpoints), or use another --workdir.") from None


def checkpointed_config(workdir: str) -> tuple[int, dict[str, Any]] | None:
    """(step, config) stored in the newest checkpoint of `workdir` that records one."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    steps = sorted((int(n) for n in os.listdir(directory) if n.isdigit()), reverse=True) \
        if os.path.isdir(directory) else []
    for step in steps:
        try:
            with open(os.path.join(directory, str(step), "meta", "metadata")) as f:
                return step, json.load(f)["config"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # damaged: `Checkpoints.restore_latest` moves it aside
    return None


def differences(old: Mapping[str, Any], new: Mapping[str, Any], ignored: Iterable[str]) -> str:
    """`key: old -> new, ...` for the flattened keys that differ, or '' if none."""
    old, new, ignored = flatten(old), flatten(new), set(ignored)
    keys = sorted(k for k in set(old) | set(new) if k not in ignored and old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(workdir: str) -> str:
    """Creates `<workdir>/run.lock` for this process, taking over one left by a dead process on
    this host; raises `WorkdirError` naming the holder if a live (or remote) process holds it."""
    path = os.path.join(workdir, LOCK_FILE)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now().isoformat(timespec="seconds")}
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(me, f)
    try:
        os.link(tmp, path)  # atomic: the lock appears with its contents, or not at all
        return path
    except FileExistsError:
        pass
    finally:
        os.remove(tmp)
    try:
        with open(path) as f:
            holder = json.load(f)
        pid, host = int(holder["pid"]), str(holder["host"])
    except (OSError, ValueError, KeyError, TypeError):
        raise WorkdirError(f"{path} exists but is unreadable; if no run is using {workdir}, "
                           "delete it and rerun.") from None
    if host != me["host"] or _pid_alive(pid):
        raise WorkdirError(f"{workdir} is in use by process {pid} on {host} (since "
                           f"{holder.get('started', '?')}); wait for it to finish, stop it, or use "
                           f"another --workdir. If that run is gone, delete {path}.")
    with open(tmp, "w") as f:
        json.dump(me, f)
    os.replace(tmp, path)
    with open(path) as f:
        if json.load(f)["pid"] != me["pid"]:  # another process took it over at the same moment
            raise WorkdirError(f"{workdir} was just taken by another run; use another --workdir.")
    logging.warning("Took over %s from process %d on %s, which is no longer running.", path, pid,
                    host)
    return path


def release_lock(path: str) -> None:
    with contextlib.suppress(OSError, ValueError, KeyError):
        with open(path) as f:
            if json.load(f)["pid"] == os.getpid():
                os.remove(path)


def _check_config(workdir: str, config: Mapping[str, Any], overwrite: bool,
                  resumable_keys: Iterable[str], defaults: Mapping[str, Any],
                  num_steps: int | None) -> None:
    """Refuses (or, with `overwrite`, clears) a workdir whose stored configurations differ."""
    stored = []
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(path):
        stored.append((path, read_json(path)))
    checkpointed = checkpointed_config(workdir)
    if checkpointed:
        stored.append((f"the checkpoint of step {checkpointed[0]}", checkpointed[1]))
    for where, old in stored:
        diff = differences({**flatten(defaults), **flatten(old)}, config, resumable_keys)
        if diff and not overwrite:
            raise WorkdirConflictError(
                f"{workdir} holds a run with a different configuration ({diff}; from {where}). "
                "Use another --workdir, or pass --overwrite to delete that run and start afresh.")
        if diff:
            if jax.process_index() == 0:
                logging.warning("--overwrite: deleting the previous run in %s", workdir)
                for name in os.listdir(workdir):
                    if name != LOCK_FILE:
                        target = os.path.join(workdir, name)
                        shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
            return
    if checkpointed and num_steps is not None and checkpointed[0] > num_steps:
        raise WorkdirError(f"{workdir} has a checkpoint of step {checkpointed[0]}, past the "
                           f"requested {num_steps} steps; pass a number of steps >= "
                           f"{checkpointed[0]}, or use another --workdir.")


def _handle_preemption(signum, frame) -> None:
    global _preemption_signal
    if _preemption_signal is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C stops at once
    _preemption_signal = signum
    logging.warning("Received %s: saving a checkpoint at the next step boundary, then stopping.",
                    signal.Signals(signum).name)


def out_of_time(start_time: float, max_minutes: float, now: float) -> bool:
    """Whether more than `max_minutes` (0: no limit) have passed between `start_time` and `now`
    (seconds)."""
    return bool(max_minutes) and now - start_time > 60 * max_minutes


def preemption_requested() -> int | None:
    """The signal (SIGTERM or SIGINT) received inside `claim`, or None."""
    return _preemption_signal


@contextlib.contextmanager
def claim(workdir: str, config: Mapping[str, Any], overwrite: bool = False,
          resumable_keys: Iterable[str] = (), defaults: Mapping[str, Any] | None = None,
          num_steps: int | None = None) -> Iterator[None]:
    """Holds `workdir` for this run for the block (module docstring), or raises `WorkdirError`.

    A workdir holding a run is accepted when its configuration equals `config` (a nested dict) in
    every flag-style key except `resumable_keys`; a key the stored configuration lacks counts as
    its value in `defaults`. With `overwrite` a different run's files are deleted instead. When
    `num_steps` is given, a checkpoint past it is refused. Once accepted, `config.json` and the
    launcher's `RECORDS` are written.
    """
    global _preemption_signal
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir {workdir} is a file, not a directory; pass a directory.")
    main = jax.process_index() == 0
    lock, handlers = None, {}
    _preemption_signal = None
    if threading.current_thread() is threading.main_thread():  # where Python runs handlers
        for signum in (signal.SIGTERM, signal.SIGINT):
            handlers[signum] = signal.signal(signum, _handle_preemption)
    try:
        if main:
            os.makedirs(workdir, exist_ok=True)
            lock = acquire_lock(workdir)
        _check_config(workdir, config, overwrite, resumable_keys, defaults or {}, num_steps)
        if main:
            for name, text in {CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True),
                               **RECORDS.get()}.items():
                tmp = os.path.join(workdir, name + ".tmp")
                with open(tmp, "w") as f:
                    f.write(text)
                os.replace(tmp, os.path.join(workdir, name))
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if lock:
            release_lock(lock)
