"""Architecture search: REINFORCE, random search and regularized evolution behind one interface,
at an equal budget of evaluations, with every evaluation recorded in `<workdir>/history.jsonl`.

A searcher proposes architectures from the history so far (`propose(history)`) and learns from
the rewards of what it proposed (`observe(architectures, rewards)`):

* `RandomSearch`: each architecture uniform over the space.
* `RegularizedEvolution` (Real et al., 2019): the first P architectures are random; afterwards the
  population is the P most recent evaluations (so each new child pushes out the oldest), a
  tournament of S distinct members picks the fittest as parent, and the child is the parent with
  exactly one decision changed to a different choice, uniformly.
* `Reinforce`: m architectures per step from the LSTM controller, then one REINFORCE update
  (`nas.controller`).

All randomness is a function of (seed, number of evaluations so far), so the run is a pure
function of its config. The budget counts proposals: an architecture proposed again is not
re-evaluated (its recorded reward is reused, `cached: true`, cost 0) but uses a slot of the budget.

Resuming: a restarted run replays `history.jsonl` -- proposals are recomputed and checked against
the recorded ones, rewards are read back, nothing is evaluated twice -- and then continues. The
controller's state is also checkpointed, so REINFORCE resumes from its latest checkpoint and only
replays the evaluations after it.

Several devices and processes: every process runs the same search (the same seeds give the same
proposals) and evaluates each architecture together with the others -- child networks train
data-parallel over the mesh (`nas.child`), the controller's state is replicated on every device
and its update runs identically everywhere -- so all processes hold the same rewards, which is
checked at the end. Only process 0 writes `history.jsonl`, metrics, pictures and `result.json`.
A resumed run reads the history and the checkpoints from the workdir, which must therefore be a
filesystem every process sees (as Orbax's multi-process checkpoints require anyway).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Protocol, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from common import checkpoints, images, metrics, parallel
from common.config import check_positive
from nas import controller as controller_lib
from nas.search_space import Architecture, MacroBenchmark, Objective, SearchSpace, reward_and_info

ALGORITHMS = ("reinforce", "random", "evolution")
SPACES = ("nas_bench_macro", "cnn")
HISTORY_FILE = "history.jsonl"


@dataclasses.dataclass(frozen=True)
class Config:
    algorithm: str = "reinforce"
    space: str = "nas_bench_macro"
    budget: int = 100  # architectures evaluated (proposals, duplicates included)
    seed: int = 0
    data_dir: str | None = None
    # REINFORCE
    architectures_per_step: int = 5  # m
    controller_hidden_size: int = 35
    controller_num_layers: int = 2
    controller_init_range: float = 0.08
    learning_rate: float = 6e-4
    entropy_weight: float = 1e-4
    baseline_decay: float = 0.95
    reward_transform: str = "cubed"
    # Regularized evolution
    population_size: int = 20
    tournament_size: int = 5
    # CNN space and child training
    num_layers: int = 3
    filter_sizes: tuple[int, ...] = (1, 3, 5, 7)  # choices of filter height and of width
    num_filters: tuple[int, ...] = (24, 36, 48, 64)
    strides: tuple[int, ...] = (1, 2)
    dataset: str = "fashion_mnist"
    batch_size: int = 64
    num_steps: int = 200  # child training steps
    child_learning_rate: float = 3e-3
    validation_size: int = 5000
    padding: str = "SAME"
    final_num_steps: int = 2000  # retraining of the best architecture
    # Bookkeeping
    checkpoint_every: int = 10  # controller steps
    log_every: int = 10  # evaluations

    def controller_config(self) -> controller_lib.ControllerConfig:
        return controller_lib.ControllerConfig(
            hidden_size=self.controller_hidden_size, num_layers=self.controller_num_layers,
            init_range=self.controller_init_range, learning_rate=self.learning_rate,
            entropy_weight=self.entropy_weight, baseline_decay=self.baseline_decay,
            reward_transform=self.reward_transform)

    def validate(self) -> None:
        for field, allowed in (("algorithm", ALGORITHMS), ("space", SPACES)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"Unknown {field} {getattr(self, field)!r}; "
                                 f"choose one of {', '.join(allowed)}.")
        check_positive(self, ("budget", "architectures_per_step", "population_size",
                              "tournament_size", "checkpoint_every", "log_every"))
        if self.tournament_size > self.population_size:
            raise ValueError(f"tournament_size ({self.tournament_size}) exceeds population_size "
                             f"({self.population_size}).")
        self.controller_config().validate()


# Keys a rerun may change without starting a different run.
RESUMABLE_KEYS = ("budget", "data_dir", "checkpoint_every", "log_every", "final_num_steps")


@dataclasses.dataclass(frozen=True)
class Record:
    """One evaluation: what was proposed, its reward, extra info and the seconds it cost."""
    index: int
    architecture: Architecture
    reward: float
    info: dict[str, Any]
    cost_s: float
    cached: bool = False

    def to_json(self, space: SearchSpace) -> str:
        row = dataclasses.asdict(self)
        row["architecture"] = list(self.architecture)
        row["values"] = space.decode(self.architecture)
        return json.dumps(row, default=str)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "Record":
        return cls(index=row["index"], architecture=tuple(row["architecture"]),
                   reward=row["reward"], info=row["info"], cost_s=row["cost_s"],
                   cached=row.get("cached", False))


# --------------------------------------------------------------------------------------------
# Searchers


class Searcher(Protocol):
    batch_size: int  # architectures per proposal

    def propose(self, history: Sequence[Record]) -> list[Architecture]: ...

    def observe(self, architectures: Sequence[Architecture], rewards: Sequence[float]) -> None: ...

    def evaluations_in_state(self) -> int:
        """Evaluations already folded into the searcher's restored state (replay starts there)."""


def _rng(seed: int, num_evaluated: int) -> np.random.Generator:
    return np.random.default_rng([seed, num_evaluated])


class RandomSearch:
    batch_size = 1

    def __init__(self, space: SearchSpace, seed: int):
        self.space, self.seed = space, seed

    def propose(self, history: Sequence[Record]) -> list[Architecture]:
        return [self.space.sample(_rng(self.seed, len(history)))]

    def observe(self, architectures, rewards) -> None:
        pass

    def evaluations_in_state(self) -> int:
        return 0


def mutate(space: SearchSpace, architecture: Architecture,
           rng: np.random.Generator) -> Architecture:
    """`architecture` with one decision (of those with 2+ choices) set to a different choice."""
    mutable = [i for i, n in enumerate(space.num_choices) if n > 1]
    if not mutable:
        return architecture
    i = mutable[int(rng.integers(len(mutable)))]
    choice = int(rng.integers(space.num_choices[i] - 1))
    choice += choice >= architecture[i]
    return architecture[:i] + (choice,) + architecture[i + 1:]


class RegularizedEvolution:
    batch_size = 1

    def __init__(self, space: SearchSpace, seed: int, population_size: int,
                 tournament_size: int):
        self.space, self.seed = space, seed
        self.population_size, self.tournament_size = population_size, tournament_size

    def propose(self, history: Sequence[Record]) -> list[Architecture]:
        rng = _rng(self.seed, len(history))
        if len(history) < self.population_size:
            return [self.space.sample(rng)]
        population = history[-self.population_size:]
        contenders = rng.choice(self.population_size, self.tournament_size, replace=False)
        parent = max(contenders, key=lambda i: (population[i].reward, i))
        return [mutate(self.space, population[parent].architecture, rng)]

    def observe(self, architectures, rewards) -> None:
        pass

    def evaluations_in_state(self) -> int:
        return 0


class Reinforce:
    """The controller as a searcher; `state` is checkpointed by the caller.

    The state lives replicated on every device of `mesh` (default: all devices of all processes),
    and sampling and the update run there, identically on every process.
    """

    def __init__(self, space: SearchSpace, seed: int, config: controller_lib.ControllerConfig,
                 architectures_per_step: int, mesh: Mesh | None = None):
        self.space, self.batch_size = space, architectures_per_step
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        self.controller = controller_lib.get_controller(space, config)
        init_key, self.sample_key = jax.random.split(jax.random.PRNGKey(seed))
        self.state = parallel.replicate(self.mesh, self.controller.init(init_key))
        self.last_metrics: dict[str, float] = {}

    @property
    def step(self) -> int:
        return int(parallel.to_host(self.state.step))

    def propose(self, history: Sequence[Record]) -> list[Architecture]:
        key = parallel.replicate(self.mesh, jax.random.fold_in(self.sample_key, self.step))
        actions, _, _ = self.controller.sample(self.state.params, key, self.batch_size)
        return [tuple(int(a) for a in row) for row in parallel.to_host(actions)]

    def observe(self, architectures, rewards) -> None:
        if len(architectures) < self.batch_size:  # the budget's last, partial batch
            return
        self.state, step_metrics = self.controller.update(self.state, *parallel.replicate(
            self.mesh, (np.asarray(architectures, np.int32), np.asarray(rewards, np.float32))))
        self.last_metrics = {k: float(v) for k, v in parallel.to_host(step_metrics).items()}

    def evaluations_in_state(self) -> int:
        return self.step * self.batch_size


# --------------------------------------------------------------------------------------------
# The loop


class HistoryMismatchError(RuntimeError):
    """history.jsonl does not match what this configuration proposes."""


def run_search(searcher: Searcher, objective: Objective, space: SearchSpace, budget: int,
               history: Sequence[Record] = (),
               on_record: Callable[[Record], None] | None = None,
               on_step: Callable[[list[Record]], None] | None = None) -> list[Record]:
    """Runs `searcher` until `budget` evaluations, replaying the given `history` first.

    Proposals at positions already in `history` must equal the recorded architectures and take
    their recorded rewards; new evaluations call `objective` (or reuse the reward of an identical
    architecture evaluated before) and are passed to `on_record` as they finish. `on_step` is
    called after each observed batch with the history so far.
    """
    history = list(history)
    evaluated = {r.architecture: r for r in history if not r.cached}
    n = searcher.evaluations_in_state()
    if n > len(history):
        raise HistoryMismatchError(f"The searcher's state covers {n} evaluations but the history "
                                   f"holds only {len(history)}.")
    while n < budget:
        proposals = [space.check(a) for a in searcher.propose(history[:n])][:budget - n]
        for j, architecture in enumerate(proposals):
            if n + j < len(history):
                if history[n + j].architecture != architecture:
                    raise HistoryMismatchError(
                        f"Evaluation {n + j} of the history is {history[n + j].architecture}, but "
                        f"this configuration proposes {architecture}: the history belongs to "
                        "another run.")
                continue
            if architecture in evaluated:
                old = evaluated[architecture]
                record = Record(n + j, architecture, old.reward, old.info, 0.0, cached=True)
            else:
                start = time.perf_counter()
                reward, info = reward_and_info(objective(architecture))
                if not np.isfinite(reward):
                    raise FloatingPointError(
                        f"Evaluation {n + j} ({space.decode(architecture)}) has the non-finite "
                        f"reward {reward} (info: {info}); it was not recorded, and the history "
                        "and checkpoints so far are intact. Fix the objective and rerun.")
                record = Record(n + j, architecture, reward, info, time.perf_counter() - start)
                evaluated[architecture] = record
            history.append(record)
            if on_record is not None:
                on_record(record)
        searcher.observe(proposals, [r.reward for r in history[n:n + len(proposals)]])
        n += len(proposals)
        if on_step is not None:
            on_step(history[:n])
    return history[:budget] if len(history) > budget else history


def best_record(history: Sequence[Record]) -> Record:
    """The evaluation of highest reward (the earliest among ties)."""
    return max(history, key=lambda r: (r.reward, -r.index))


def best_so_far(history: Sequence[Record]) -> np.ndarray:
    return np.maximum.accumulate([r.reward for r in history])


# --------------------------------------------------------------------------------------------
# history.jsonl


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
            raise ValueError(f"{path} line {i + 1} holds evaluation {records[-1].index}.")
    return records


def write_history(workdir: str, space: SearchSpace, history: Sequence[Record]) -> None:
    """Rewrites history.jsonl atomically with exactly `history` (drops a torn last line)."""
    path = os.path.join(workdir, HISTORY_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(r.to_json(space) + "\n" for r in history)
    os.replace(tmp, path)


def append_history(workdir: str, space: SearchSpace, record: Record) -> None:
    with open(os.path.join(workdir, HISTORY_FILE), "a") as f:
        f.write(record.to_json(space) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------
# The run of a config in a workdir


def make_problem(config: Config, mesh: Mesh | None = None) -> tuple[SearchSpace, Objective]:
    """The search space and objective named by the config (child networks trained over `mesh`)."""
    if config.space == "nas_bench_macro":
        benchmark = MacroBenchmark(config.data_dir)
        return benchmark.space, benchmark
    from nas import child  # imports the data pipeline only for real child training
    return child.make_problem(config, mesh)


def make_searcher(config: Config, space: SearchSpace, mesh: Mesh | None = None) -> Searcher:
    if config.algorithm == "random":
        return RandomSearch(space, config.seed)
    if config.algorithm == "evolution":
        return RegularizedEvolution(space, config.seed, config.population_size,
                                    config.tournament_size)
    return Reinforce(space, config.seed, config.controller_config(), config.architectures_per_step,
                     mesh)


def history_arrays(history: Sequence[Record]) -> dict[str, np.ndarray]:
    return {"architectures": np.asarray([r.architecture for r in history], np.float64),
            "rewards": np.asarray([r.reward for r in history], np.float64)}


def outcome(searcher: Searcher, history: Sequence[Record]):
    """What identifies a finished search, for `parallel.fingerprint`: the controller's parameters
    (REINFORCE), else the history's architectures and rewards."""
    return searcher.state.params if isinstance(searcher, Reinforce) else history_arrays(history)


def check_processes_agree(history: Sequence[Record], what: str) -> None:
    """Raises unless every process holds the same architectures and rewards, bit for bit; a
    collective, so every process must call it (it is also a barrier)."""
    if jax.process_count() > 1:
        arrays = history_arrays(history)
        digest = hashlib.sha256(arrays["architectures"].tobytes() + arrays["rewards"].tobytes())
        multihost_utils.assert_equal(
            np.frombuffer(digest.digest(), np.uint32),
            f"The processes disagree on the architectures and rewards of the {what} (this "
            f"process holds {len(history)} evaluations)")


def save_best_curve(workdir: str, algorithm: str, history: Sequence[Record]) -> str:
    xs = np.arange(1, len(history) + 1)
    return images.save_curves(os.path.join(workdir, "best_reward.png"),
                              {algorithm: (xs, best_so_far(history))},
                              xlabel="architectures evaluated", ylabel="best reward so far",
                              title=f"{algorithm}: best reward vs evaluations")


def train_and_evaluate(config: Config, workdir: str, overwrite: bool = False,
                       space: SearchSpace | None = None,
                       objective: Objective | None = None) -> dict[str, Any]:
    """Searches (or resumes the search) in `workdir` up to `config.budget` evaluations.

    `space` and `objective` default to those named by `config.space`; pass your own to search
    any space (on several processes, every process calls it, and it must return the same reward
    on each). Returns a summary: the best record, and for the CNN space the test accuracy of the
    best architecture retrained for `final_num_steps` (also written to `result.json`).
    """
    config.validate()
    if (space is None) != (objective is None):
        raise ValueError("Pass both a space and an objective, or neither.")
    mesh = parallel.make_mesh()
    child_batch = ""
    if config.space == "cnn" and space is None:
        per_device = parallel.check_global_batch(config.batch_size, mesh, "child batch size")
        child_batch = (f"; child batch {config.batch_size} = {mesh.devices.size} devices x "
                       f"{per_device}")
    if space is None:
        space, objective = make_problem(config, mesh)
    checkpoints.claim_workdir(workdir, dataclasses.asdict(config), overwrite, RESUMABLE_KEYS)
    if jax.process_count() > 1:  # an --overwrite deletion by process 0 is over
        multihost_utils.sync_global_devices("nas: workdir claimed")
    history = read_history(workdir)
    check_processes_agree(history, "history read")  # all have read it before it is rewritten
    main = parallel.is_main_process()
    if main:
        write_history(workdir, space, history)
    searcher = make_searcher(config, space, mesh)
    ckpts = None
    if isinstance(searcher, Reinforce):
        ckpts = checkpoints.Checkpoints(workdir, config.checkpoint_every)
        searcher.state, step = ckpts.restore_latest(searcher.state)
        if step:
            logging.info("Resumed from the checkpoint of step %d (controller steps, %d "
                         "evaluations).", step, searcher.evaluations_in_state())
    replay_from = searcher.evaluations_in_state()
    logging.info("%s on a space of %d decisions (%d architectures), budget %d; %d evaluations "
                 "in the history; %d processes, %d devices%s.", config.algorithm, len(space),
                 space.size, config.budget, len(history), jax.process_count(),
                 mesh.devices.size, child_batch)
    writer = metrics.MetricWriter(workdir, resume_step=replay_from)
    progress = metrics.Progress(config.budget, replay_from, item_name="architectures")
    last_checkpoint = ckpts.latest_step() if ckpts is not None else None

    def on_record(record: Record) -> None:
        if main:
            append_history(workdir, space, record)

    def on_step(done: list[Record]) -> None:
        nonlocal last_checkpoint
        n = len(done)
        row = {"reward": done[-1].reward, "best_reward": best_record(done).reward,
               **getattr(searcher, "last_metrics", {})}
        metrics.check_finite(n, row, last_checkpoint)
        step = searcher.step if ckpts is not None else 0
        if step and step != ckpts.latest_step():  # a last, partial batch leaves the step as is
            if ckpts.save(step, searcher.state, force=n == config.budget):
                last_checkpoint = step
        crossed = n // config.log_every > (n - searcher.batch_size) // config.log_every
        if n > replay_from and (crossed or n == config.budget):
            writer.write(n, {**row, **progress.log(n, row)})

    try:
        history = run_search(searcher, objective, space, config.budget, history, on_record,
                             on_step)
    finally:
        if ckpts is not None:
            ckpts.close()
        writer.close()
    check_processes_agree(history, "search")
    parallel.log_fingerprint(len(history), outcome(searcher, history))
    best = best_record(history)
    summary = {"algorithm": config.algorithm, "evaluations": len(history),
               "distinct_architectures": sum(not r.cached for r in history),
               "best": json.loads(best.to_json(space)),
               "evaluation_cost_s": sum(r.cost_s for r in history)}
    if config.space == "cnn" and objective is not None and hasattr(objective, "final_test"):
        summary["final"] = objective.final_test(best.architecture, config.final_num_steps)
    if main:
        save_best_curve(workdir, config.algorithm, history)
        with open(os.path.join(workdir, "result.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        logging.info("Best of %d: %s reward %.4f %s", len(history),
                     space.decode(best.architecture), best.reward, best.info)
    return summary
