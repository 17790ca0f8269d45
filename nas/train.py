"""Architecture search: REINFORCE, random search and regularized evolution behind one interface,
at an equal budget of evaluations, with every proposal recorded in `<workdir>/history.jsonl`.

A searcher proposes architectures from the history so far (`propose(history)`) and learns from
the rewards of what it proposed (`observe(architectures, rewards)`):

* `RandomSearch`: each architecture uniform over the space.
* `RegularizedEvolution` (Real et al., 2019, Algorithm 1): the first P proposals are random;
  afterwards the population is the P most recent proposals (so each new child pushes out the
  oldest), a tournament of S members drawn uniformly *with replacement* from it (as in the
  paper's `RandomElement` loop) picks the fittest as parent, and the child is the parent with
  exactly one decision changed to a different choice, uniformly.
* `Reinforce`: m architectures per step from the LSTM controller (`nas.controller`), then a
  controller update on them: the search's train step (`make_train_step`, jitted by
  `jit_train_step`).

All randomness is a function of (seed, number of proposals so far), so the run is a pure function
of its config.

The budget counts evaluations -- calls of the objective, i.e. child trainings, what a user pays
for. An architecture proposed again is not re-evaluated: its recorded reward is reused (`cached:
true`, cost 0) and the proposal is free. So that a policy that only repeats itself still ends,
the proposals (repeats included) are capped at `max_proposals_factor x budget`. The search ends
when either count is reached; each history row carries both (`index` + 1 proposals,
`evaluations`), and so does `result.json`.

Resuming: a restarted run replays `history.jsonl` -- proposals are recomputed and checked against
the recorded ones, rewards are read back, nothing is evaluated twice -- and then continues. A
searcher's state (the controller's, for REINFORCE; none for the others) is also checkpointed, so
REINFORCE resumes from its latest checkpoint and only replays the proposals after it. The
workdir's `search.json` records the space (its decisions and choices) and the objective's name; a
rerun with another space or objective is refused (`IdentityMismatchError`), naming what differs.

Several devices and processes: every process runs the same search (the same seeds give the same
proposals) and evaluates each architecture together with the others -- child networks train
data-parallel over the mesh (`nas.child`), the controller's state is replicated on every device
and its update runs identically everywhere -- so all processes hold the same rewards, which is
checked at the end. Only process 0 writes `history.jsonl`, metrics, pictures and `result.json`.
A resumed run reads the history and the checkpoints from the workdir, which must therefore be a
filesystem every process sees (as Orbax's multi-process checkpoints require anyway).

Without a workdir, `search(config, space, objective)` runs the same search in memory and returns
its history and best (`SearchResult`). The evaluation of a workdir search's result (final
retraining, `result.json`) is `nas.evaluate`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import sys
import time
from typing import Any, Callable, Protocol, Sequence, TextIO

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from common import checkpoints, metrics, parallel, workdirs
from common import config as config_lib
from common.config import check_positive, choice, nested
from nas import controller as controller_lib
from nas import evaluate
from nas.child import ChildConfig, ChildObjective, ChildTrainer, load_child_data
from nas.controller import ControllerConfig, ControllerState
from nas.history import (HistoryAppender, Record, best_record, count_evaluations, history_arrays,
                         read_history, write_history)
from nas.search_space import (FILTER_SIZES, NUM_FILTERS, STRIDES, Architecture, MacroBenchmark,
                              Objective, SearchSpace, cnn_space, reward_and_info)

ALGORITHMS = ("reinforce", "random", "evolution")
SPACES = ("nas_bench_macro", "cnn")


@dataclasses.dataclass(frozen=True)
class EvolutionConfig:
    """Regularized evolution.

    Attributes:
      population_size: Regularized evolution: population P, the P most recent proposals.
      tournament_size: Regularized evolution: tournament S, members of the population drawn
        uniformly with replacement per proposal (Real et al. 2019, Algorithm 1); the fittest is
        the parent.
    """
    population_size: int = 20
    tournament_size: int = 10


@dataclasses.dataclass(frozen=True)
class Config:
    """An architecture search and, for the CNN space, the children it trains.

    Attributes:
      algorithm: Search algorithm.
      space: nas_bench_macro: tabular CIFAR-10 benchmark (no training); cnn: Zoph & Le's CNN
        space with child networks trained on --child_dataset.
      budget: Evaluations (objective calls, i.e. child trainings); a repeated proposal reuses its
        reward and is free. A rerun with a larger value continues.
      max_proposals_factor: Proposals, repeats included, are capped at this times the budget,
        so a policy that only repeats itself ends.
      seed: Seed of the search, and of the children's initialisation and minibatch order.
      data_dir: Folder of the data: NAS-Bench-Macro's json, or the children's dataset.
      architectures_per_step: REINFORCE: m, architectures per controller step.
      controller: The REINFORCE controller.
      evolution: Regularized evolution.
      num_layers: CNN space: layers of a child network.
      filter_sizes: CNN space: choices of filter height and width.
      num_filters: CNN space: choices of the number of filters.
      strides: CNN space: choices of the stride.
      child: CNN space: training and scoring of each child.
      final_num_steps: CNN space: training steps of the final retraining of the best
        architecture (test accuracy).
      checkpoint_every: Controller steps between checkpoints (REINFORCE).
      history_sync_s: history.jsonl is synced to disk at most every this many seconds (and
          before each checkpoint): slow evaluations are saved as they finish, cheap ones in
          batches (0: every record at once).
      log_every: Proposals between metric rows.
    """
    algorithm: str = choice("reinforce", ALGORITHMS)
    space: str = choice("nas_bench_macro", SPACES)
    budget: int = 100
    max_proposals_factor: int = 10
    seed: int = 0
    data_dir: str | None = None
    architectures_per_step: int = 5
    controller: ControllerConfig = nested(ControllerConfig)
    evolution: EvolutionConfig = nested(EvolutionConfig)
    num_layers: int = 3
    filter_sizes: tuple[int, ...] = FILTER_SIZES
    num_filters: tuple[int, ...] = NUM_FILTERS
    strides: tuple[int, ...] = STRIDES
    child: ChildConfig = nested(ChildConfig)
    final_num_steps: int = 2000
    checkpoint_every: int = 10
    history_sync_s: float = 1.0
    log_every: int = 10

    @property
    def max_proposals(self) -> int:
        return self.max_proposals_factor * self.budget

    def validate(self) -> None:
        config_lib.check_choices(self)
        check_positive(self, ("budget", "max_proposals_factor", "architectures_per_step",
                              "checkpoint_every", "log_every"))
        if self.history_sync_s < 0:
            raise ValueError(f"history_sync_s must be >= 0, got {self.history_sync_s}.")
        check_positive(self.evolution, ("population_size", "tournament_size"))
        self.controller.validate()
        self.child.validate()


# Keys a rerun may change without starting a different run.
RESUMABLE_KEYS = ("budget", "max_proposals_factor", "data_dir", "checkpoint_every",
                  "history_sync_s", "log_every",
                  "final_num_steps", "child_steps_per_call")


# --------------------------------------------------------------------------------------------
# The controller's train step


def root_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(key of the controller's initialisation, key its samples fold the step into)."""
    init_key, sample_key = jax.random.split(jax.random.PRNGKey(seed))
    return init_key, sample_key


def create_train_state(config: ControllerConfig, space: SearchSpace,
                       key: jax.Array) -> ControllerState:
    """The controller's initial state (`nas.controller.init_state`)."""
    return controller_lib.init_state(key, space, config)


def make_train_step(config: ControllerConfig, space: SearchSpace):
    """train_step(state, (architectures [m, D], rewards [m])) -> (state, metrics): one REINFORCE
    update of the controller (unjitted)."""
    def train_step(state: ControllerState, batch) -> tuple[ControllerState, dict[str, Any]]:
        architectures, rewards = batch
        return controller_lib.update(state, architectures, rewards, space=space, config=config)
    return train_step


@functools.lru_cache(maxsize=32)
def jit_train_step(config: ControllerConfig, space: SearchSpace, mesh: Mesh):
    """`make_train_step` jitted with everything replicated over `mesh`; compiled once per
    (controller config, space, mesh) in a process."""
    replicated = parallel.replicated_sharding(mesh)
    return jax.jit(make_train_step(config, space), in_shardings=replicated,
                   out_shardings=replicated)


@functools.lru_cache(maxsize=32)
def jit_sample(config: ControllerConfig, space: SearchSpace, batch_size: int, mesh: Mesh):
    """sample(params, key) -> (architectures [m, D], log_probs [m], entropies [m]) under the
    config's temperature and tanh constant, jitted with everything replicated over `mesh`."""
    replicated = parallel.replicated_sharding(mesh)
    return jax.jit(functools.partial(controller_lib.sample, space=space, batch_size=batch_size,
                                     temperature=config.temperature,
                                     tanh_constant=config.tanh_constant),
                   in_shardings=replicated, out_shardings=replicated)


# --------------------------------------------------------------------------------------------
# Searchers


class Searcher(Protocol):
    """What the search loop needs of a searcher.

    `batch_size` architectures are proposed at a time. `state` is the pytree the loop
    checkpoints and restores (None: nothing to save), `step` the number of updates folded into
    it (the checkpoint's step; 0 for a searcher without state), and `last_metrics` the metrics of
    the latest update ({} without one).
    """
    batch_size: int
    state: Any

    @property
    def step(self) -> int: ...

    @property
    def last_metrics(self) -> dict[str, float]: ...

    def propose(self, history: Sequence[Record]) -> list[Architecture]: ...

    def observe(self, architectures: Sequence[Architecture], rewards: Sequence[float]) -> None: ...

    def proposals_in_state(self) -> int:
        """Proposals already folded into the searcher's restored state (replay starts there)."""

    def outcome(self, history: Sequence[Record]) -> Any:
        """What identifies the finished search, for `parallel.fingerprint`."""


def _rng(seed: int, num_evaluated: int) -> np.random.Generator:
    return np.random.default_rng([seed, num_evaluated])


class StatelessSearcher:
    """A searcher whose proposals are a function of the history alone: nothing to learn from
    the rewards, nothing to checkpoint; its outcome is the history's architectures and rewards."""
    batch_size = 1
    state = None
    step = 0
    last_metrics: dict[str, float] = {}

    def observe(self, architectures, rewards) -> None:
        pass

    def proposals_in_state(self) -> int:
        return 0

    def outcome(self, history: Sequence[Record]) -> Any:
        return history_arrays(history)


class RandomSearch(StatelessSearcher):
    def __init__(self, space: SearchSpace, seed: int):
        self.space, self.seed = space, seed

    def propose(self, history: Sequence[Record]) -> list[Architecture]:
        return [self.space.sample(_rng(self.seed, len(history)))]


def mutate(space: SearchSpace, architecture: Architecture,
           rng: np.random.Generator) -> Architecture:
    """`architecture` with one decision (of those with 2+ choices) set to a different choice."""
    mutable = [i for i, n in enumerate(space.num_choices) if n > 1]
    if not mutable:
        return architecture
    i = mutable[int(rng.integers(len(mutable)))]
    choice_ = int(rng.integers(space.num_choices[i] - 1))
    choice_ += choice_ >= architecture[i]
    return architecture[:i] + (choice_,) + architecture[i + 1:]


class RegularizedEvolution(StatelessSearcher):
    def __init__(self, space: SearchSpace, seed: int, config: EvolutionConfig):
        self.space, self.seed = space, seed
        self.population_size, self.tournament_size = (config.population_size,
                                                      config.tournament_size)

    def propose(self, history: Sequence[Record]) -> list[Architecture]:
        rng = _rng(self.seed, len(history))
        if len(history) < self.population_size:
            return [self.space.sample(rng)]
        population = history[-self.population_size:]
        contenders = rng.integers(self.population_size, size=self.tournament_size)
        parent = max(contenders, key=lambda i: (population[i].reward, i))
        return [mutate(self.space, population[parent].architecture, rng)]


class Reinforce:
    """The controller as a searcher; its `state` is checkpointed by the loop.

    The state lives replicated on every device of `mesh` (default: all devices of all processes),
    and sampling and the update run there, identically on every process.
    """

    def __init__(self, space: SearchSpace, seed: int, config: ControllerConfig,
                 architectures_per_step: int, mesh: Mesh | None = None):
        config.validate()
        self.space, self.batch_size = space, architectures_per_step
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        init_key, self.sample_key = root_keys(seed)
        self.state = parallel.replicate(self.mesh, create_train_state(config, space, init_key))
        self.sample = jit_sample(config, space, architectures_per_step, self.mesh)
        self.train_step = jit_train_step(config, space, self.mesh)
        self.last_metrics: dict[str, float] = {}

    @property
    def step(self) -> int:
        return int(parallel.to_host(self.state.step))

    def propose(self, history: Sequence[Record]) -> list[Architecture]:
        key = parallel.replicate(self.mesh, jax.random.fold_in(self.sample_key, self.step))
        actions, _, _ = self.sample(self.state.params, key)
        return [tuple(int(a) for a in row) for row in parallel.to_host(actions)]

    def observe(self, architectures, rewards) -> None:
        if len(architectures) < self.batch_size:  # the budget's last, partial batch
            return
        self.state, step_metrics = self.train_step(self.state, parallel.replicate(
            self.mesh, (np.asarray(architectures, np.int32), np.asarray(rewards, np.float32))))
        self.last_metrics = {k: float(v) for k, v in parallel.to_host(step_metrics).items()}

    def proposals_in_state(self) -> int:
        return self.step * self.batch_size

    def outcome(self, history: Sequence[Record]) -> Any:
        return self.state.params


def make_searcher(config: Config, space: SearchSpace, mesh: Mesh | None = None) -> Searcher:
    if config.algorithm == "random":
        return RandomSearch(space, config.seed)
    if config.algorithm == "evolution":
        return RegularizedEvolution(space, config.seed, config.evolution)
    return Reinforce(space, config.seed, config.controller, config.architectures_per_step, mesh)


# --------------------------------------------------------------------------------------------
# The loop


class HistoryMismatchError(RuntimeError):
    """history.jsonl does not match what this configuration proposes."""


def search_finished(history: Sequence[Record], space: SearchSpace, budget: int,
                    max_proposals: int) -> bool:
    """Whether a search has spent its budget of evaluations (or evaluated the whole space) or
    reached its cap of proposals."""
    return (count_evaluations(history) >= min(budget, space.size)
            or len(history) >= max_proposals)


def run_search(searcher: Searcher, objective: Objective, space: SearchSpace, budget: int,
               max_proposals: int, history: Sequence[Record] = (),
               on_record: Callable[[Record], None] | None = None,
               on_step: Callable[[list[Record]], None] | None = None) -> list[Record]:
    """Runs `searcher` until `budget` evaluations (or the whole space evaluated) or
    `max_proposals` proposals, replaying the given `history` first; returns the history of every
    proposal.

    Proposals at positions already in `history` must equal the recorded architectures and take
    their recorded rewards; a new proposal calls `objective` (one evaluation) unless its
    architecture was evaluated before, in which case the old reward is reused (`cached`, free).
    A batch is cut where the search ends (its rest is never evaluated nor observed). New records
    are passed to `on_record` as they finish; `on_step` is called after each observed batch with
    the history so far.
    """
    history = list(history)
    evaluated = {r.architecture: r for r in history if not r.cached}
    n = searcher.proposals_in_state()
    if n > len(history):
        raise HistoryMismatchError(f"The searcher's state covers {n} proposals but the history "
                                   f"holds only {len(history)}.")
    budget = min(budget, space.size)
    spent = count_evaluations(history[:n])
    while spent < budget and n < max_proposals:
        proposals = [space.check(a) for a in searcher.propose(history[:n])]
        taken = 0
        for architecture in proposals:
            i = n + taken
            if spent >= budget or i >= max_proposals:
                break
            if i < len(history):
                if history[i].architecture != architecture:
                    raise HistoryMismatchError(
                        f"Proposal {i} of the history is {history[i].architecture}, but this "
                        f"configuration proposes {architecture}: the history belongs to another "
                        "run.")
                record = history[i]
            elif architecture in evaluated:
                old = evaluated[architecture]
                record = Record(i, architecture, old.reward, old.info, 0.0, cached=True,
                                evaluations=spent)
            else:
                start = time.perf_counter()
                reward, info = reward_and_info(objective(architecture))
                if not np.isfinite(reward):
                    raise FloatingPointError(
                        f"Evaluation {spent} (proposal {i}, {space.decode(architecture)}) has the "
                        f"non-finite reward {reward} (info: {info}); it was not recorded, and the "
                        "history and checkpoints so far are intact. Fix the objective and rerun.")
                record = Record(i, architecture, reward, info, time.perf_counter() - start,
                                evaluations=spent + 1)
                evaluated[architecture] = record
            spent += not record.cached
            taken += 1
            if i == len(history):
                history.append(record)
                if on_record is not None:
                    on_record(record)
        searcher.observe(proposals[:taken], [r.reward for r in history[n:n + taken]])
        n += taken
        if on_step is not None:
            on_step(history[:n])
    return history[:n]


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """An in-memory search: every proposal in order (`history`) and the best evaluation."""
    history: list[Record]
    best: Record

    @property
    def evaluations(self) -> int:
        return count_evaluations(self.history)

    @property
    def proposals(self) -> int:
        return len(self.history)


def progress_printer(budget: int, every_s: float = 10.0, stream: TextIO | None = None
                     ) -> Callable[[list[Record]], None]:
    """An `on_step` that prints `evaluations n/budget, proposals, best reward, elapsed, ETA` to
    `stream` (default stderr) at most every `every_s` seconds and once the budget is spent:
    progress in a Python session, where absl's INFO logging is off without `app.run`."""
    start = time.monotonic()
    last = [-math.inf]

    def on_step(history: list[Record]) -> None:
        now, spent = time.monotonic(), count_evaluations(history)
        if now - last[0] < every_s and spent < budget:
            return
        last[0] = now
        elapsed = now - start
        eta = elapsed / spent * (budget - spent) if spent else math.inf
        print(f"search: evaluations {spent}/{budget}, proposals {len(history)}, best reward "
              f"{best_record(history).reward:.6g}, {elapsed:.0f} s elapsed, ETA "
              f"{eta:.0f} s", file=stream or sys.stderr, flush=True)

    return on_step


def search(config: Config, space: SearchSpace, objective: Objective,
           on_step: Callable[[list[Record]], None] | None = None,
           progress: bool = True) -> SearchResult:
    """`config.algorithm` over `space` for `config.budget` evaluations of `objective`, in memory:
    no workdir, no files, no checkpoints. `objective(architecture)` returns a reward (any real
    number, higher is better) or `(reward, info)`; `on_step(history)` is called after each batch
    of proposals; `progress` prints a line every 10 s and at the end (`progress_printer`)."""
    config.validate()
    printer = progress_printer(min(config.budget, space.size)) if progress else None

    def each_step(history: list[Record]) -> None:
        for callback in (printer, on_step):
            if callback:
                callback(history)

    history = run_search(make_searcher(config, space), objective, space, config.budget,
                         config.max_proposals, on_step=each_step)
    return SearchResult(history, best_record(history))


# --------------------------------------------------------------------------------------------
# The run of a config in a workdir


def make_problem(config: Config, mesh: Mesh | None = None
                 ) -> tuple[SearchSpace, Objective, evaluate.FinalTest | None]:
    """The search space, objective and final test named by the config (child networks trained
    over `mesh`; no final test for the tabular benchmark)."""
    if config.space == "nas_bench_macro":
        benchmark = MacroBenchmark(config.data_dir)
        return benchmark.space, benchmark, None
    child_config = dataclasses.replace(
        config.child, steps_per_call=min(config.child.steps_per_call, config.child.num_steps))
    space = cnn_space(config.num_layers, tuple(config.filter_sizes), tuple(config.num_filters),
                      tuple(config.strides))
    trainer = ChildTrainer(child_config, load_child_data(child_config, config.data_dir), mesh,
                           config.seed)
    objective = ChildObjective(space, trainer)
    return space, objective, functools.partial(evaluate.final_test, objective)


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


def objective_identity(objective: Objective) -> str:
    """The default name of a user's objective: its qualified name (a function's, or its class's)."""
    return getattr(objective, "__qualname__", type(objective).__qualname__)


def search_identity(space: SearchSpace, objective_name: str) -> dict[str, Any]:
    """What a workdir's history is a history of: the objective's name, and the space's decisions
    in order with each decision's choices (as JSON, non-JSON values by `str`). Stored with the
    config (`config.json`, checkpoints) under the key `search`, so that a rerun with another
    space or objective is refused by the workdir claim, naming the differing keys
    (`search_objective`, `search_space_decisions`, `search_space_choices_<decision>`)."""
    return {"objective": objective_name, "space": {
        "decisions": list(space.names),
        "choices": json.loads(json.dumps(dict(space.decisions), default=str))}}


def train_and_evaluate(config: Config, workdir: str, overwrite: bool = False,
                       space: SearchSpace | None = None, objective: Objective | None = None,
                       final_test: evaluate.FinalTest | None = None,
                       objective_name: str | None = None) -> dict[str, Any]:
    """Searches (or resumes the search) in `workdir` up to `config.budget` evaluations.

    `space` and `objective` default to those named by `config.space`; pass your own to search
    any space (on several processes, every process calls it, and it must return the same reward
    on each). `objective_name` (default: the objective's qualified name; for the built-in spaces,
    `config.space`) is recorded with the space in the workdir, and a rerun with another name or
    space is refused (`workdirs.WorkdirConflictError`) unless `overwrite`.
    `final_test(architecture, final_num_steps)` scores the best architecture at the end
    (default: for the CNN space, retraining it and testing; with your own objective, none).
    Returns the summary of `nas.evaluate.evaluate` (also written to `result.json`).
    """
    config.validate()
    if (space is None) != (objective is None):
        raise ValueError("Pass both a space and an objective, or neither.")
    if objective_name is None:
        objective_name = config.space if objective is None else objective_identity(objective)
    mesh = parallel.make_mesh()
    child_batch = ""
    if config.space == "cnn" and space is None:
        per_device = parallel.check_global_batch(config.child.batch_size, mesh,
                                                 "child batch size")
        child_batch = (f"; child batch {config.child.batch_size} = {mesh.devices.size} devices "
                       f"x {per_device}")
    if space is None:
        space, objective, final_test = make_problem(config, mesh)
    config_dict = {**config_lib.to_dict(config), "search": search_identity(space, objective_name)}
    with workdirs.claim(workdir, config_dict, overwrite, RESUMABLE_KEYS,
                        defaults=config_lib.to_dict(Config())):
        if jax.process_count() > 1:  # an --overwrite deletion by process 0 is over
            multihost_utils.sync_global_devices("nas: workdir claimed")
        searcher = make_searcher(config, space, mesh)
        history = _search(config, workdir, config_dict, mesh, space, objective, searcher,
                          child_batch)
        check_processes_agree(history, "search")
        parallel.log_fingerprint(len(history), searcher.outcome(history))
        return evaluate.evaluate(workdir, config.algorithm, space, history, final_test,
                                 config.final_num_steps, config_dict["search"])


def _search(config: Config, workdir: str, config_dict: dict[str, Any], mesh: Mesh,
            space: SearchSpace, objective: Objective, searcher: Searcher,
            child_batch: str) -> list[Record]:
    """Replays the workdir's history and searches on to the budget: history.jsonl, checkpoints of
    the searcher's state, metrics. Returns the history."""
    history = read_history(workdir)
    check_processes_agree(history, "history read")  # all have read it before it is rewritten
    main = parallel.is_main_process()
    if main:
        write_history(workdir, space, history)
    with checkpoints.Checkpoints(workdir, config.checkpoint_every, config=config_dict) as ckpts:
        searcher.state, step = ckpts.restore_latest(searcher.state)  # None stays None
        if step:
            logging.info("Resumed from the checkpoint of step %d (controller steps, %d "
                         "proposals).", step, searcher.proposals_in_state())
        replay_from = searcher.proposals_in_state()
        logging.info("%s on a space of %d decisions (%d architectures), budget %d evaluations "
                     "(at most %d proposals); %d proposals (%d evaluations) in the history; %d "
                     "processes, %d devices%s.", config.algorithm, len(space), space.size,
                     config.budget, config.max_proposals, len(history),
                     count_evaluations(history), jax.process_count(), mesh.devices.size,
                     child_batch)
        writer = metrics.MetricWriter(workdir, resume_step=replay_from)
        progress = metrics.Progress(config.budget, count_evaluations(history[:replay_from]))
        pending = metrics.PendingMetrics(last_checkpoint=ckpts.last_good)

        appender = HistoryAppender(workdir, space, config.history_sync_s)

        def on_record(record: Record) -> None:
            if main:
                appender.append(record)

        def on_step(done: list[Record]) -> None:
            n = len(done)
            finished = search_finished(done, space, config.budget, config.max_proposals)
            pending.add({"reward": done[-1].reward, "best_reward": best_record(done).reward,
                         "evaluations": done[-1].evaluations, **searcher.last_metrics})
            row = pending.fetch(n)[-1]
            step = searcher.step
            if finished or (step and ckpts.due(step)) or workdirs.preemption_requested():
                appender.flush()  # the history on disk before the state that covers it
            if step and step != ckpts.latest_step():  # a last, partial batch leaves the step
                if ckpts.save(step, searcher.state, force=finished):
                    pending.checkpointed(step)
            crossed = n // config.log_every > (n - searcher.batch_size) // config.log_every
            if n > replay_from and (crossed or finished):
                writer.write(n, {**row, **progress.log(done[-1].evaluations, row)})
            ckpts.stop_if_preempted(step or n, searcher.state)  # the history is on disk

        try:
            return run_search(searcher, objective, space, config.budget, config.max_proposals,
                              history, on_record, on_step)
        finally:
            if main:
                appender.flush()
            writer.close()
