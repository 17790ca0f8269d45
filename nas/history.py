"""The record of a search: one `Record` per proposal, kept in `<workdir>/history.jsonl`, and what
is read off it (the best evaluation, the best reward so far, the two counts of the budget).

A proposal is either an evaluation (the objective was called: a child trained) or a repeat of an
architecture evaluated before (`cached`: its recorded reward reused at no cost). Record `i` is
proposal `i`; its `evaluations` is the number of evaluations among proposals 0..i, the budget a
search spends."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Sequence

import numpy as np
from absl import logging

from nas.search_space import Architecture, SearchSpace

HISTORY_FILE = "history.jsonl"


@dataclasses.dataclass(frozen=True)
class Record:
    """One proposal: its position `index`, the architecture, its reward, extra info, the seconds
    it cost, whether the reward was reused from an earlier evaluation (`cached`), and the number
    of evaluations (non-cached proposals) up to and including this one."""
    index: int
    architecture: Architecture
    reward: float
    info: dict[str, Any]
    cost_s: float
    cached: bool = False
    evaluations: int = 0

    def to_json(self, space: SearchSpace) -> str:
        row = dataclasses.asdict(self)
        row["architecture"] = list(self.architecture)
        row["values"] = space.decode(self.architecture)
        return json.dumps(row, default=str)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "Record":
        return cls(index=row["index"], architecture=tuple(row["architecture"]),
                   reward=row["reward"], info=row["info"], cost_s=row["cost_s"],
                   cached=row.get("cached", False), evaluations=row.get("evaluations", 0))


def read_history(workdir: str) -> list[Record]:
    """The records of `<workdir>/history.jsonl`; a torn last line (a kill mid-write) is dropped."""
    path = os.path.join(workdir, HISTORY_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(Record.from_dict(json.loads(line)))
        except (json.JSONDecodeError, KeyError) as e:
            if i == len(lines) - 1:
                logging.warning("Dropping the torn last line of %s (%s).", path, e)
                break
            raise ValueError(f"{path} line {i + 1} is not a history record ({e}); the file is "
                             "damaged: move it away to restart the search.") from e
        if records[-1].index != i:
            raise ValueError(f"{path} line {i + 1} holds proposal {records[-1].index}.")
    return with_evaluation_counts(records)


def with_evaluation_counts(history: Sequence[Record]) -> list[Record]:
    """`history` with each record's `evaluations` set to the running count of non-cached ones."""
    counts = np.cumsum([not r.cached for r in history])
    return [dataclasses.replace(r, evaluations=int(c)) for r, c in zip(history, counts)]


def write_history(workdir: str, space: SearchSpace, history: Sequence[Record]) -> None:
    """Rewrites history.jsonl atomically with exactly `history` (drops a torn last line)."""
    path = os.path.join(workdir, HISTORY_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(r.to_json(space) + "\n" for r in history)
    os.replace(tmp, path)


class HistoryAppender:
    """Appends records to history.jsonl, written and synced to disk at most every `sync_every_s`
    seconds: a record that took longer than that to evaluate (a child training) is on disk as soon
    as it finishes, while cheap ones (a table lookup) are synced in batches. `flush()` writes what
    is pending; the search calls it before every checkpoint and at the end, so the history on disk
    is never behind the searcher's saved state. A kill loses at most `sync_every_s` seconds of
    evaluations, which the resumed search proposes and evaluates again."""

    def __init__(self, workdir: str, space: SearchSpace, sync_every_s: float):
        self.path = os.path.join(workdir, HISTORY_FILE)
        self.space, self.sync_every_s = space, sync_every_s
        self.pending: list[str] = []
        self.last_sync = -math.inf

    def append(self, record: Record) -> None:
        self.pending.append(record.to_json(self.space) + "\n")
        if time.monotonic() - self.last_sync >= self.sync_every_s:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            with open(self.path, "a") as f:
                f.writelines(self.pending)
                f.flush()
                os.fsync(f.fileno())
            self.pending = []
        self.last_sync = time.monotonic()


def count_evaluations(history: Sequence[Record]) -> int:
    """Evaluations (objective calls) in `history`: the proposals that are not cached repeats."""
    return sum(not r.cached for r in history)


def history_arrays(history: Sequence[Record]) -> dict[str, np.ndarray]:
    return {"architectures": np.asarray([r.architecture for r in history], np.float64),
            "rewards": np.asarray([r.reward for r in history], np.float64)}


def best_record(history: Sequence[Record]) -> Record:
    """The evaluation of highest reward (the earliest among ties)."""
    return max(history, key=lambda r: (r.reward, -r.index))


def best_so_far(history: Sequence[Record]) -> np.ndarray:
    return np.maximum.accumulate([r.reward for r in history])
