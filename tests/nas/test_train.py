"""Random search, regularized evolution, REINFORCE through one loop (`nas.train`); history.jsonl
and resume."""

import collections
import dataclasses
import json
import os

import numpy as np
import pytest

from common import checkpoints, workdirs
from nas import history as history_lib
from nas import train
from nas.controller import ControllerConfig
from nas.search_space import SearchSpace
from tests.conftest import run_python

SPACE = SearchSpace((("a", (0, 1)), ("b", ("x", "y", "z")), ("c", (1, 2, 3, 4))))


def toy_objective(architecture):
    """Best at (1, 2, 3); reward 1 - distance / 10, with the distance in the info."""
    distance = sum(abs(a - b) for a, b in zip(architecture, (1, 2, 3)))
    return 1.0 - distance / 10, {"distance": distance}


def record(index, architecture, reward):
    return history_lib.Record(index, tuple(architecture), reward, {}, 0.0)


def test_random_search_covers_the_space_uniformly():
    searcher = train.RandomSearch(SPACE, seed=0)
    counts = collections.Counter()
    history = []
    for i in range(4800):
        (architecture,) = searcher.propose(history)
        history.append(record(i, architecture, 0.0))
        counts[architecture] += 1
    assert set(counts) == {(a, b, c) for a in range(2) for b in range(3) for c in range(4)}
    expected = 4800 / SPACE.size  # 200 each, sd ~14
    assert all(abs(n - expected) < 0.3 * expected for n in counts.values()), counts


def test_mutation_changes_exactly_one_decision_and_stays_in_the_space():
    rng = np.random.default_rng(0)
    space = SearchSpace((("fixed", (7,)), ("a", (0, 1)), ("b", (0, 1, 2, 3, 4))))
    changed = collections.Counter()
    for _ in range(500):
        parent = space.sample(rng)
        child = train.mutate(space, parent, rng)
        assert space.contains(child)
        diff = [i for i, (p, c) in enumerate(zip(parent, child)) if p != c]
        assert len(diff) == 1
        changed[diff[0]] += 1
    assert changed[0] == 0 and changed[1] > 175 and changed[2] > 175  # 250 each expected


def test_evolution_draws_parents_from_the_youngest_population_only():
    population, tournament = 4, 4  # the tournament sees the whole population: parent = its best
    evolution = train.RegularizedEvolution(SPACE, seed=0, config=train.EvolutionConfig(
        population_size=population, tournament_size=tournament))
    history = [record(0, (1, 2, 3), 1.0)]  # the best ever, and the oldest
    history += [record(i, (0, 0, 0), 0.1) for i in range(1, 4)]
    history += [record(4, (0, 1, 1), 0.5)]  # best of the last 4: (0, 0, 0) x3 and this
    for _ in range(20):
        (child,) = evolution.propose(history)
        assert SPACE.contains(child)
        assert sum(a != b for a, b in zip(child, (0, 1, 1))) == 1
    before_full = evolution.propose(history[:3])[0]
    assert before_full == SPACE.sample(np.random.default_rng([0, 3]))  # random until P evaluated


def test_evolution_tournament_draws_with_replacement_as_in_real_et_al():
    """Algorithm 1 of Real et al. (2019) draws each of the S candidates uniformly from the
    population, which keeps it: with P = S = 2 the worse member is the parent when it is drawn
    twice, a quarter of the time (without replacement, never)."""
    config = train.EvolutionConfig(population_size=2, tournament_size=2)
    history = [record(0, (1, 2, 3), 1.0), record(1, (0, 0, 0), 0.0)]
    worse_parent = 0
    for seed in range(400):
        (child,) = train.RegularizedEvolution(SPACE, seed, config).propose(history)
        worse_parent += sum(a != b for a, b in zip(child, (0, 0, 0))) == 1
    assert 60 < worse_parent < 140  # 100 expected, sd 8.7


def test_budget_counts_evaluations_repeats_are_free_and_proposals_are_capped():
    """Every algorithm: `budget` distinct evaluations, repeats served from the cache without a
    call, each record's `evaluations` the running count; with a cap of 1 x budget, exactly
    `budget` proposals and fewer evaluations for a searcher that repeats itself."""
    calls = []

    def objective(architecture):
        assert SPACE.contains(architecture)
        calls.append(architecture)
        return toy_objective(architecture)

    config = train.Config(budget=12, architectures_per_step=5,
                          evolution=train.EvolutionConfig(population_size=6, tournament_size=3),
                          controller=ControllerConfig(hidden_size=8, learning_rate=0.05))
    for algorithm in train.ALGORITHMS:
        for factor in (10, 1):
            calls.clear()
            run = dataclasses.replace(config, algorithm=algorithm, max_proposals_factor=factor)
            history = train.run_search(train.make_searcher(run, SPACE), objective, SPACE,
                                       run.budget, run.max_proposals)
            assert [r.index for r in history] == list(range(len(history)))
            assert len(calls) == len(set(calls)) == history_lib.count_evaluations(history)
            assert [r.evaluations for r in history] == list(
                np.cumsum([not r.cached for r in history]))
            for r in history:
                assert r.reward == toy_objective(r.architecture)[0]
            if factor == 10:
                assert len(calls) == 12 and not history[-1].cached, algorithm  # the 12th call
                assert len(history) > 12, algorithm  # all three repeat on this small space
            else:
                assert len(history) == 12 and len(calls) < 12, algorithm


class Stuck(train.StatelessSearcher):
    """Proposes the same architecture forever: a collapsed policy."""

    def propose(self, history):
        return [(1, 2, 3)]


def test_a_searcher_that_only_repeats_ends_at_the_proposal_cap():
    calls = []
    history = train.run_search(Stuck(), lambda a: calls.append(a) or 0.5, SPACE, budget=7,
                               max_proposals=70)
    assert len(history) == 70 and calls == [(1, 2, 3)]
    assert [r.cached for r in history] == [False] + [True] * 69
    assert history[-1].evaluations == 1


def test_search_ends_when_the_whole_space_is_evaluated():
    history = train.run_search(train.RandomSearch(SPACE, seed=0), toy_objective, SPACE,
                               budget=1000, max_proposals=10_000)
    assert history_lib.count_evaluations(history) == SPACE.size and not history[-1].cached


# The kill -9 scenarios below count on this controller's sequence of proposals (when repeats
# happen), so it is pinned rather than following the shipped defaults.
TOY_CONTROLLER = dict(hidden_size=8, learning_rate=0.05, entropy_weight=0.3, topk_size=0)


def _config(tmp_path, **overrides):
    settings = dict(algorithm="reinforce", budget=24, architectures_per_step=4,
                    controller=ControllerConfig(**TOY_CONTROLLER), checkpoint_every=3)
    return train.Config(**{**settings, **overrides}), str(tmp_path)


class Killed(Exception):
    pass


@pytest.mark.parametrize("algorithm,kill_at", [("reinforce", 14), ("evolution", 8)])
def test_resume_after_kill_replays_history_without_reevaluating(tmp_path, algorithm, kill_at):
    config, _ = _config(tmp_path)
    config = dataclasses.replace(config, algorithm=algorithm, evolution=train.EvolutionConfig(
        population_size=6, tournament_size=3))
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"), space=SPACE,
                                         objective=toy_objective, objective_name="toy")

    calls = []

    def dying_objective(architecture):
        if len(calls) == kill_at:  # REINFORCE: after its checkpoint of step 3 (12 evaluations)
            raise Killed
        calls.append(architecture)
        return toy_objective(architecture)

    workdir = str(tmp_path / "killed")
    with pytest.raises(Killed):
        train.train_and_evaluate(config, workdir, space=SPACE, objective=dying_objective,
                                 objective_name="toy")
    assert len(history_lib.read_history(workdir)) >= kill_at  # and repeats served from them
    with open(os.path.join(workdir, history_lib.HISTORY_FILE), "a") as f:
        f.write('{"index": 99, "archi')  # a torn line, as a kill mid-write leaves
    calls_before_resume = list(calls)

    def counting_objective(architecture):
        calls.append(architecture)
        return toy_objective(architecture)

    resumed = train.train_and_evaluate(config, workdir, space=SPACE, objective=counting_objective,
                                       objective_name="toy")
    assert len(calls) == len(set(calls))  # nothing evaluated twice
    assert calls[:len(calls_before_resume)] == calls_before_resume
    strip = lambda row: {k: v for k, v in row.items() if k != "cost_s"}  # noqa: E731
    assert strip(resumed["best"]) == strip(straight["best"])
    a = [json.loads(line) for line in open(os.path.join(workdir, history_lib.HISTORY_FILE))]
    b = [json.loads(line) for line in open(tmp_path / "straight" / history_lib.HISTORY_FILE)]
    assert [strip(r) for r in a] == [strip(r) for r in b]
    assert os.path.exists(os.path.join(workdir, "best_reward.png"))
    if algorithm == "reinforce":
        assert os.path.isdir(os.path.join(workdir, "checkpoints"))


KILLED_SEARCH = """
import os, sys
from nas import train
from nas.controller import ControllerConfig
from tests.nas.test_train import SPACE, TOY_CONTROLLER, toy_objective
calls = []
def dying(architecture):  # a kill -9 at the 15th evaluation: nothing is flushed
    if len(calls) == 14:
        os._exit(9)
    calls.append(architecture)
    return toy_objective(architecture)
config = train.Config(algorithm="reinforce", budget=24, architectures_per_step=4,
                      controller=ControllerConfig(**TOY_CONTROLLER),
                      checkpoint_every=3, history_sync_s=1e9)
train.train_and_evaluate(config, sys.argv[1], space=SPACE, objective=dying,
                         objective_name="toy")
"""


def test_batched_history_syncs_are_never_behind_a_checkpoint_after_kill_9(tmp_path):
    """history_sync_s=1e9: records reach the disk only before checkpoints; a kill -9 loses the
    unsynced ones, which the resumed search evaluates again, and ends as an unkilled run."""
    config, _ = _config(tmp_path, history_sync_s=1e9)
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"), space=SPACE,
                                         objective=toy_objective, objective_name="toy")
    workdir = str(tmp_path / "killed")
    proc = run_python(["-c", KILLED_SEARCH, workdir], check=False)
    assert proc.returncode == 9, proc.stderr[-2000:]
    on_disk = history_lib.read_history(workdir)
    assert len(on_disk) == 12, "synced before the checkpoint of step 3 only: 2 evaluations lost"
    saved = checkpoints.Checkpoints(workdir, 3).latest_step()  # 3, or 1 if 3 was still in flight
    assert 4 * saved <= len(on_disk), "the history on disk covers the saved state"
    resumed = train.train_and_evaluate(config, workdir, space=SPACE, objective=toy_objective,
                                       objective_name="toy")
    strip = lambda row: {k: v for k, v in row.items() if k != "cost_s"}  # noqa: E731
    assert strip(resumed["best"]) == strip(straight["best"])
    a = [strip(json.loads(line)) for line in open(os.path.join(workdir, "history.jsonl"))]
    b = [strip(json.loads(line)) for line in open(tmp_path / "straight" / "history.jsonl")]
    assert a == b


def test_history_appender_syncs_slow_records_at_once_and_cheap_ones_in_batches(tmp_path):
    record = lambda i: history_lib.Record(i, (0, 0, 0), 1.0, {}, 0.0)  # noqa: E731
    lines = lambda: len(open(tmp_path / "history.jsonl").read().splitlines())  # noqa: E731
    every = history_lib.HistoryAppender(str(tmp_path), SPACE, 0.0)
    every.append(record(0))
    assert lines() == 1
    batched = history_lib.HistoryAppender(str(tmp_path), SPACE, 1e9)
    batched.append(record(1))  # the first record: nothing synced yet, so it is due
    batched.append(record(2))
    batched.append(record(3))
    assert lines() == 2 and len(batched.pending) == 2
    batched.flush()
    assert lines() == 4 and not batched.pending


def test_history_of_another_run_is_refused(tmp_path):
    config, workdir = _config(tmp_path, seed=1)
    train.train_and_evaluate(dataclasses.replace(config, algorithm="random", budget=5), workdir,
                              space=SPACE, objective=toy_objective)
    lines = open(os.path.join(workdir, history_lib.HISTORY_FILE)).read().splitlines()
    row = json.loads(lines[2])
    row["architecture"] = [1 - row["architecture"][0]] + row["architecture"][1:]
    lines[2] = json.dumps(row)
    open(os.path.join(workdir, history_lib.HISTORY_FILE), "w").write("\n".join(lines) + "\n")
    with pytest.raises(train.HistoryMismatchError, match="Proposal 2"):
        train.train_and_evaluate(dataclasses.replace(config, algorithm="random", budget=8),
                                  workdir, space=SPACE, objective=toy_objective)


def _other_objective(architecture):
    return -toy_objective(architecture)[0]


@pytest.mark.parametrize("change,named", [
    (dict(objective_name="other"), "search_objective: 'toy' -> 'other'"),
    (dict(space=SearchSpace((("a", (0, 1)), ("b", ("x", "y")), ("c", (1, 2, 3, 4))))),
     "search_space_choices_b: ['x', 'y', 'z'] -> ['x', 'y']"),
    (dict(space=SearchSpace((("a", (0, 1)), ("c", (1, 2, 3, 4)), ("b", ("x", "y", "z"))))),
     "search_space_decisions: ['a', 'b', 'c'] -> ['a', 'c', 'b']"),
])
def test_resume_with_another_space_or_objective_is_refused_naming_it(tmp_path, change, named):
    config, workdir = _config(tmp_path, algorithm="random", budget=5)
    train.train_and_evaluate(config, workdir, space=SPACE, objective=toy_objective,
                             objective_name="toy")
    before = history_lib.read_history(workdir)
    run = {"space": SPACE, "objective": toy_objective, "objective_name": "toy", **change}
    with pytest.raises(workdirs.WorkdirConflictError) as error:
        train.train_and_evaluate(dataclasses.replace(config, budget=8), workdir, **run)
    assert named in str(error.value)
    assert history_lib.read_history(workdir) == before  # untouched
    summary = train.train_and_evaluate(config, workdir, overwrite=True, **run)
    assert summary["search"] == train.search_identity(run["space"], run["objective_name"])
    assert json.load(open(os.path.join(workdir, "result.json")))["search"] == summary["search"]


def test_the_default_objective_name_is_the_objectives_name(tmp_path):
    config, workdir = _config(tmp_path, algorithm="random", budget=5)
    train.train_and_evaluate(config, workdir, space=SPACE, objective=toy_objective)
    with pytest.raises(workdirs.WorkdirConflictError, match="toy_objective' -> '_other_objective"):
        train.train_and_evaluate(config, workdir, space=SPACE, objective=_other_objective)


def test_in_memory_search_example(capsys):
    """The README's example: REINFORCE (the defaults) without a workdir; the reward any real
    number, higher is better."""
    space = SearchSpace((("activation", ("relu", "tanh", "gelu")), ("width", (8, 16, 32, 64)),
                         ("depth", (1, 2, 3))))

    def objective(architecture):
        values = space.decode(architecture)
        return 100 * (values["activation"] == "gelu") + values["width"] - (values["depth"] - 2) ** 2

    seen = []
    result = train.search(train.Config(budget=20, seed=0), space, objective,
                          on_step=lambda history: seen.append(history[-1].evaluations))
    assert result.evaluations == 20 == seen[-1] and result.proposals >= 20
    assert result.best.reward == max(r.reward for r in result.history)
    assert space.decode(result.best.architecture) == {"activation": "gelu", "width": 64,
                                                      "depth": 2}
    assert result.best.reward == max(objective(a) for a in np.ndindex(*space.num_choices))
    printed = capsys.readouterr().err.strip().splitlines()  # the progress, without app.run
    assert printed[-1].startswith(f"search: evaluations 20/20, proposals {result.proposals}, "
                                  f"best reward {result.best.reward:.6g}"), printed


def test_user_defined_space_and_objective_through_the_public_api(tmp_path):
    """A space of 3 decisions with words as choices and a plain function as objective."""
    space = SearchSpace((("activation", ("relu", "tanh", "gelu")), ("width", (8, 16, 32, 64)),
                         ("depth", (1, 2, 3))))

    def objective(architecture):
        values = space.decode(architecture)
        return (values["activation"] == "gelu") + values["width"] / 64 + 0.1 * values["depth"]

    config = train.Config(algorithm="evolution", budget=24, seed=3,
                          evolution=train.EvolutionConfig(population_size=10, tournament_size=4))
    summary = train.train_and_evaluate(config, str(tmp_path), space=space, objective=objective)
    exhaustive = max(objective(a) for a in np.ndindex(*space.num_choices))
    assert summary["best"]["reward"] == pytest.approx(exhaustive)
    assert summary["best"]["values"] == {"activation": "gelu", "width": 64, "depth": 3}
    history = history_lib.read_history(str(tmp_path))
    assert history_lib.count_evaluations(history) == summary["evaluations"] == 24
    assert len(history) == summary["proposals"]
    np.testing.assert_allclose(history_lib.best_so_far(history)[-1], exhaustive)


def test_larger_budget_continues_a_finished_reinforce_run(tmp_path):
    """Budget 10 with m = 4 may end inside a batch; extending to 15 equals a straight 15."""
    config, _ = _config(tmp_path, checkpoint_every=1)
    short = dataclasses.replace(config, budget=10)
    train.train_and_evaluate(short, str(tmp_path / "extended"), space=SPACE,
                              objective=toy_objective)
    long = dataclasses.replace(config, budget=15)
    extended = train.train_and_evaluate(long, str(tmp_path / "extended"), space=SPACE,
                                         objective=toy_objective)
    straight = train.train_and_evaluate(long, str(tmp_path / "straight"), space=SPACE,
                                         objective=toy_objective)
    read = lambda name: [(r.architecture, r.reward, r.evaluations)  # noqa: E731
                         for r in history_lib.read_history(str(tmp_path / name))]
    assert read("extended") == read("straight") and read("straight")[-1][2] == 15
    assert extended["best"]["architecture"] == straight["best"]["architecture"]


def test_non_finite_reward_stops_the_search_before_it_is_recorded(tmp_path):
    config, workdir = _config(tmp_path, checkpoint_every=1, budget=16)
    calls = []

    def objective(architecture):
        calls.append(architecture)
        return float("nan") if len(calls) == 10 else toy_objective(architecture)

    with pytest.raises(FloatingPointError, match="non-finite reward nan") as error:
        train.train_and_evaluate(config, workdir, space=SPACE, objective=objective,
                                 objective_name="toy")
    history = history_lib.read_history(workdir)
    assert f"Evaluation 9 (proposal {len(history)}, " in str(error.value)
    assert sum(not r.cached for r in history) == 9 and all(np.isfinite(r.reward) for r in history)
    with checkpoints.Checkpoints(workdir, 1) as ckpts:  # every finished controller step saved
        assert ckpts.latest_step() == len(history) // config.architectures_per_step
    resumed = train.train_and_evaluate(config, workdir, space=SPACE, objective=toy_objective,
                                       objective_name="toy")
    assert resumed["evaluations"] == config.budget
