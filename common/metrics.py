"""Metrics a run writes to its workdir, and progress lines for the console.

`MetricWriter` appends one JSON object per logged step to `metrics.jsonl` and mirrors scalars to
TensorBoard event files (`tensorboard/`). Only process 0 writes; other processes' writers are
inert, so a multi-host run leaves exactly one copy.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import types
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

from common import parallel

METRICS_FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        value = np.asarray(value)
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _event_file_writer(directory: str):
    """TensorBoard's event-file writer, on its file-system stub rather than TensorFlow's.

    Left alone, the writer's first write imports TensorFlow when it is installed (about 9 s);
    the module `tensorboard.compat.notf` is TensorBoard's switch to its own stub, which writes
    local files just as well.
    """
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    return EventFileWriter(directory)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
    """Appends rows to `<workdir>/metrics.jsonl` and TensorBoard; process 0 only.

    On resume, rows from steps after `resume_step` (written after the checkpoint a run restarts
    from) are dropped first, so the file of a resumed run equals that of an uninterrupted one.
    """

    def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True,
                 log_every: int | None = None):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        kept = [r for r in read_metrics(workdir) if r.get("step", 0) <= resume_step]
        if log_every and resume_step:
            warn_about_gaps(self.path, {r.get("step") for r in kept}, resume_step, log_every)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)
        if tensorboard:
            self._tb = _event_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.active:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        try:
            line = json.dumps(row, allow_nan=False)
        except ValueError:
            check_finite(step, row, None)
            raise
        with open(self.path, "a") as f:
            f.write(line + "\n")
        if self._tb is not None:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                      for k, v in row.items() if k != "step" and isinstance(v, (int, float))]
            self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                               summary=summary_pb2.Summary(value=values)))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def write_json(path: str, result: Any, non_finite: str = "error") -> str:
    """Writes `result` to `path` atomically as strict JSON. A non-finite number raises
    `FloatingPointError` naming the file (`non_finite="error"`) or is written as null
    (`non_finite="null"`: for results where divergence is an outcome, not a failure)."""
    try:
        text = json.dumps(result, indent=2, allow_nan=False, default=_plain)
    except ValueError:
        if non_finite != "null":
            raise FloatingPointError(f"Non-finite values in the results for {path} (not written): "
                                     f"{result}") from None
        text = json.dumps(nulls_for_non_finite(result), indent=2, default=_plain)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


def nulls_for_non_finite(value: Any) -> Any:
    """`value` (numbers, arrays, dicts, lists) as plain JSON values, non-finite floats as None."""
    value = _plain(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: nulls_for_non_finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nulls_for_non_finite(v) for v in value]
    return value


def warn_about_gaps(path: str, steps: set, resume_step: int, log_every: int) -> None:
    """Logs a warning naming the logged steps up to `resume_step` that `path` lacks."""
    missing = [s for s in range(log_every, resume_step + 1, log_every) if s not in steps]
    if missing:
        logging.warning("%s lacks the rows of %d logged steps before the checkpoint of step %d "
                        "(steps %d to %d); the file was edited or deleted, and those rows are "
                        "lost.", path, len(missing), resume_step, missing[0], missing[-1])


class Progress:
    """Logs `step/total, steps/s, <items>/s, ETA` and the given metrics every call to `log`."""

    def __init__(self, total_steps: int, start_step: int = 0, items_per_step: int = 0,
                 item_name: str = "images"):
        self.total_steps = total_steps
        self.items_per_step = items_per_step
        self.item_name = item_name
        self._last_step = start_step
        self._last_time = time.perf_counter()

    def rates(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps = step - self._last_step
        seconds = max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        rates = {"steps_per_s": steps / seconds}
        if self.items_per_step:
            rates[f"{self.item_name}_per_s"] = steps * self.items_per_step / seconds
        return rates

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        rates = self.rates(step)
        remaining = (self.total_steps - step) / max(rates["steps_per_s"], 1e-9)
        shown = ", ".join(f"{k}={_format(_plain(v))}" for k, v in metrics.items())
        line = (f"step {step}/{self.total_steps} | {rates['steps_per_s']:.2f} steps/s"
                + (f", {_rate(rates[self.item_name + '_per_s'])} {self.item_name}/s"
                   if self.items_per_step else "")
                + f" | ETA {_duration(remaining)} | {shown}")
        if jax.process_index() == 0:
            logging.info(line)
        return rates


def _rate(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _format(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


def due(done: int, every: int, total: int) -> bool:
    """Whether the step that brings the count of finished steps to `done` is one of every
    `every` steps, or the last of `total`."""
    return done % every == 0 or done == total


class PendingMetrics:
    """Step metrics left on the device until a loop needs them (fetching every step would stall
    the dispatch of the next), then brought to the host together and checked to be finite.

    `add` also bounds JAX's asynchronous dispatch: it waits until the step `max_in_flight` before
    the newest has finished, so the loop never runs more than that many steps ahead of the
    device. The device stays busy, and a preemption signal, checked after each step, is acted on
    (the state saved) within `max_in_flight` steps rather than after a whole queue of them."""

    def __init__(self, last_checkpoint: int | None, max_in_flight: int = 2):
        self.last_checkpoint = last_checkpoint
        self.max_in_flight = max_in_flight
        self._pending: list = []

    def add(self, step_metrics: Mapping[str, Any]) -> None:
        self._pending.append(step_metrics)
        if len(self._pending) > self.max_in_flight:
            jax.block_until_ready(self._pending[-1 - self.max_in_flight])

    def fetch(self, step: int) -> list[dict]:
        """The metrics of steps `step - n + 1 .. step` (the n added since the last fetch) as
        host values; raises `FloatingPointError` (see `check_finite`) at the first bad step."""
        rows, self._pending = parallel.to_host(self._pending), []
        for offset, row in enumerate(rows):
            check_finite(step - len(rows) + 1 + offset, row, self.last_checkpoint)
        return rows

    def check(self, step: int, row: Mapping[str, Any]) -> Mapping[str, Any]:
        """`row` (e.g. an evaluation's metrics) after `check_finite`."""
        check_finite(step, row, self.last_checkpoint)
        return row

    def checkpointed(self, step: int) -> None:
        """Records that the state after `step` is saved: a later NaN error names it."""
        self.last_checkpoint = step


def check_finite(step: int, metrics: Mapping[str, Any], last_checkpoint: int | None) -> None:
    """Raises `FloatingPointError` naming the step and every non-finite metric (nested in lists
    too); `last_checkpoint` is the newest checkpoint known intact (saved or verified)."""
    bad = {k: _plain(v) for k, v in metrics.items()
           if np.issubdtype(np.asarray(v).dtype, np.number) and not np.all(np.isfinite(v))}
    if bad:
        where = (f"the last good checkpoint (step {last_checkpoint}) is intact"
                 if last_checkpoint else "no checkpoint had been written")
        raise FloatingPointError(
            f"Non-finite metrics at step {step}: {bad}; all metrics: "
            f"{ {k: _plain(v) for k, v in metrics.items()} }. Training stopped; {where}. "
            "Lower the learning rate or check the data.")
