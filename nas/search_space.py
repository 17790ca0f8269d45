"""Search spaces as sequences of categorical decisions, and objectives over them.

A search space is a tuple of decisions `(name, choices)`. An architecture is a tuple of choice
indices, one per decision, so a single controller, mutation operator or random sampler serves every
space. An objective is any callable `architecture -> reward` or `architecture -> (reward, info)`,
where `info` is a JSON-serialisable dict recorded next to the reward.

Two spaces ship with the library:

* `cnn_space(num_layers)`: the CNN space of Zoph & Le (2017): per layer, filter height and width in
  {1, 3, 5, 7}, number of filters in {24, 36, 48, 64} and stride in {1, 2}.
* NAS-Bench-Macro (Su et al., 2021): 8 layers, each one of {identity, MB3_K3, MB6_K5}; every one
  of its 3^8 = 6561 architectures trained on CIFAR-10 with 3 seeds. `MacroBenchmark` searches on
  the seed-0 accuracy (its only "validation" signal) and reports the mean of seeds 1 and 2 as the
  test accuracy of the architecture chosen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Sequence

import numpy as np

from common.data import CorruptDataError

Architecture = tuple[int, ...]
Objective = Callable[[Architecture], Any]


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """A sequence of categorical decisions; `decisions[i] = (name, choices)`."""

    decisions: tuple[tuple[str, tuple[Any, ...]], ...]

    def __post_init__(self):
        decisions = tuple((str(name), tuple(choices)) for name, choices in self.decisions)
        object.__setattr__(self, "decisions", decisions)
        if not decisions:
            raise ValueError("A search space needs at least one decision.")
        for name, choices in decisions:
            if not choices:
                raise ValueError(f"Decision {name!r} has no choices.")
        names = [name for name, _ in decisions]
        if len(set(names)) != len(names):
            raise ValueError(f"Decision names must be unique, got {names}.")

    @property
    def num_choices(self) -> tuple[int, ...]:
        return tuple(len(choices) for _, choices in self.decisions)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.decisions)

    @property
    def size(self) -> int:
        return math.prod(self.num_choices)

    def __len__(self) -> int:
        return len(self.decisions)

    def contains(self, architecture: Sequence[int]) -> bool:
        return len(architecture) == len(self) and all(
            0 <= int(a) < n for a, n in zip(architecture, self.num_choices))

    def check(self, architecture: Sequence[int]) -> Architecture:
        """`architecture` as a tuple of ints, or ValueError naming what does not fit."""
        if not self.contains(architecture):
            raise ValueError(f"Architecture {tuple(architecture)} is not in the space "
                             f"(choices per decision: {self.num_choices}).")
        return tuple(int(a) for a in architecture)

    def decode(self, architecture: Sequence[int]) -> dict[str, Any]:
        """The chosen value of each decision, by name."""
        architecture = self.check(architecture)
        return {name: choices[a] for (name, choices), a in zip(self.decisions, architecture)}

    def sample(self, rng: np.random.Generator) -> Architecture:
        """A uniformly random architecture."""
        return tuple(int(rng.integers(n)) for n in self.num_choices)


def reward_and_info(result: Any) -> tuple[float, dict[str, Any]]:
    """Normalises an objective's return value, `reward` or `(reward, info)`."""
    if isinstance(result, tuple):
        reward, info = result
        return float(reward), dict(info)
    return float(result), {}


# --------------------------------------------------------------------------------------------
# Zoph & Le's CNN space

FILTER_SIZES = (1, 3, 5, 7)
NUM_FILTERS = (24, 36, 48, 64)
STRIDES = (1, 2)
LAYER_DECISIONS = ("filter_height", "filter_width", "num_filters", "stride")


def cnn_space(num_layers: int, filter_sizes: Sequence[int] = FILTER_SIZES,
              num_filters: Sequence[int] = NUM_FILTERS,
              strides: Sequence[int] = STRIDES) -> SearchSpace:
    """Per layer `l`: `l/filter_height`, `l/filter_width`, `l/num_filters`, `l/stride`."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
    per_layer = dict(zip(LAYER_DECISIONS, (filter_sizes, filter_sizes, num_filters, strides)))
    return SearchSpace(tuple((f"{layer}/{name}", tuple(choices))
                             for layer in range(num_layers) for name, choices in per_layer.items()))


def cnn_layers(space: SearchSpace, architecture: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """A `cnn_space` architecture as layers `(filter_height, filter_width, filters, stride)`."""
    values = space.decode(architecture)
    num_layers = len(space) // len(LAYER_DECISIONS)
    return tuple(tuple(int(values[f"{layer}/{name}"]) for name in LAYER_DECISIONS)
                 for layer in range(num_layers))


# --------------------------------------------------------------------------------------------
# NAS-Bench-Macro

MACRO_FILE = "nas-bench-macro_cifar10.json"
MACRO_OPERATIONS = ("identity", "mb3_k3", "mb6_k5")
MACRO_LAYERS = 8
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MACRO_PATH = os.path.join(REPO_ROOT, os.pardir, "shared", "data", "nas", MACRO_FILE)


def macro_space() -> SearchSpace:
    return SearchSpace(tuple((f"layer_{i}", MACRO_OPERATIONS) for i in range(MACRO_LAYERS)))


def find_macro_file(data_dir: str | None = None) -> str:
    """The NAS-Bench-Macro json: `data_dir` (the file, or a folder holding it, or its `nas/`
    subfolder), else `<repo>/../shared/data/nas/`."""
    candidates = []
    if data_dir:
        candidates += [data_dir, os.path.join(data_dir, MACRO_FILE),
                       os.path.join(data_dir, "nas", MACRO_FILE)]
    candidates.append(os.path.normpath(DEFAULT_MACRO_PATH))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"NAS-Bench-Macro ({MACRO_FILE}) not found. Looked at:\n  - " + "\n  - ".join(candidates)
        + "\nPass --data_dir=<folder holding it>.")


class MacroBenchmark:
    """NAS-Bench-Macro as an objective: reward = seed-0 CIFAR-10 accuracy / 100.

    `info["test_accuracy"]` is the mean of the seed-1 and seed-2 accuracies (in %), the figure to
    report for the architecture a search chooses by reward.
    """

    def __init__(self, data_dir: str | None = None):
        self.path = find_macro_file(data_dir)
        try:
            with open(self.path) as f:
                table = json.load(f)
        except json.JSONDecodeError as e:
            raise CorruptDataError(f"{self.path} is not valid JSON ({e}): damaged or truncated. "
                                   "Download NAS-Bench-Macro again.") from None
        self.space = macro_space()
        if len(table) != self.space.size:
            raise CorruptDataError(f"{self.path} holds {len(table)} architectures; NAS-Bench-Macro "
                                   f"has {self.space.size}. Download it again.")
        self.table = table

    @staticmethod
    def key(architecture: Sequence[int]) -> str:
        return "".join(str(int(a)) for a in architecture)

    def __call__(self, architecture: Sequence[int]) -> tuple[float, dict[str, Any]]:
        entry = self.table[self.key(self.space.check(architecture))]
        seed0, seed1, seed2 = entry["test_acc"]
        return seed0 / 100.0, {"test_accuracy": (seed1 + seed2) / 2, "params": entry["params"],
                               "flops": entry["flops"]}

    def oracle(self) -> tuple[Architecture, float]:
        """The architecture of best seed-0 accuracy, and its test accuracy (mean of seeds 1-2)."""
        best = max(self.table, key=lambda k: self.table[k]["test_acc"][0])
        return tuple(int(c) for c in best), self(tuple(int(c) for c in best))[1]["test_accuracy"]
