"""Random search, regularized evolution, REINFORCE through one loop; history.jsonl and resume."""

import collections
import dataclasses
import json
import os

import numpy as np
import pytest

from common import checkpoints
from nas import search
from nas.search_space import SearchSpace

SPACE = SearchSpace((("a", (0, 1)), ("b", ("x", "y", "z")), ("c", (1, 2, 3, 4))))


def toy_objective(architecture):
    """Best at (1, 2, 3); reward 1 - distance / 10, with the distance in the info."""
    distance = sum(abs(a - b) for a, b in zip(architecture, (1, 2, 3)))
    return 1.0 - distance / 10, {"distance": distance}


def record(index, architecture, reward):
    return search.Record(index, tuple(architecture), reward, {}, 0.0)


def test_random_search_covers_the_space_uniformly():
    searcher = search.RandomSearch(SPACE, seed=0)
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
        child = search.mutate(space, parent, rng)
        assert space.contains(child)
        diff = [i for i, (p, c) in enumerate(zip(parent, child)) if p != c]
        assert len(diff) == 1
        changed[diff[0]] += 1
    assert changed[0] == 0 and changed[1] > 175 and changed[2] > 175  # 250 each expected


def test_evolution_draws_parents_from_the_youngest_population_only():
    population, tournament = 4, 4  # the tournament sees the whole population: parent = its best
    evolution = search.RegularizedEvolution(SPACE, seed=0, population_size=population,
                                            tournament_size=tournament)
    history = [record(0, (1, 2, 3), 1.0)]  # the best ever, and the oldest
    history += [record(i, (0, 0, 0), 0.1) for i in range(1, 4)]
    history += [record(4, (0, 1, 1), 0.5)]  # best of the last 4: (0, 0, 0) x3 and this
    for _ in range(20):
        (child,) = evolution.propose(history)
        assert SPACE.contains(child)
        assert sum(a != b for a, b in zip(child, (0, 1, 1))) == 1
    before_full = evolution.propose(history[:3])[0]
    assert before_full == SPACE.sample(np.random.default_rng([0, 3]))  # random until P evaluated


def test_equal_budget_and_no_evaluation_outside_the_space():
    calls = []

    def objective(architecture):
        assert SPACE.contains(architecture)
        calls.append(architecture)
        return toy_objective(architecture)

    config = search.Config(budget=23, architectures_per_step=5, population_size=6,
                           tournament_size=3, controller_hidden_size=8, learning_rate=0.05)
    for algorithm in search.ALGORITHMS:
        calls.clear()
        searcher = search.make_searcher(dataclasses.replace(config, algorithm=algorithm), SPACE)
        history = search.run_search(searcher, objective, SPACE, config.budget)
        assert [r.index for r in history] == list(range(23))
        assert len(calls) == len(set(calls)) == sum(not r.cached for r in history)
        for r in history:
            assert r.reward == toy_objective(r.architecture)[0]


def _config(tmp_path, **overrides):
    settings = dict(algorithm="reinforce", budget=24, architectures_per_step=4,
                    controller_hidden_size=8, learning_rate=0.05, checkpoint_every=3)
    return search.Config(**{**settings, **overrides}), str(tmp_path)


class Killed(Exception):
    pass


@pytest.mark.parametrize("algorithm,kill_at", [("reinforce", 14), ("evolution", 8)])
def test_resume_after_kill_replays_history_without_reevaluating(tmp_path, algorithm, kill_at):
    config, _ = _config(tmp_path)
    config = dataclasses.replace(config, algorithm=algorithm, population_size=6,
                                 tournament_size=3)
    straight = search.train_and_evaluate(config, str(tmp_path / "straight"), space=SPACE,
                                         objective=toy_objective)

    calls = []

    def dying_objective(architecture):
        if len(calls) == kill_at:  # REINFORCE: after its checkpoint of step 3 (12 evaluations)
            raise Killed
        calls.append(architecture)
        return toy_objective(architecture)

    workdir = str(tmp_path / "killed")
    with pytest.raises(Killed):
        search.train_and_evaluate(config, workdir, space=SPACE, objective=dying_objective)
    assert len(search.read_history(workdir)) >= kill_at  # and repeats served from them
    with open(os.path.join(workdir, search.HISTORY_FILE), "a") as f:
        f.write('{"index": 99, "archi')  # a torn line, as a kill mid-write leaves
    calls_before_resume = list(calls)

    def counting_objective(architecture):
        calls.append(architecture)
        return toy_objective(architecture)

    resumed = search.train_and_evaluate(config, workdir, space=SPACE, objective=counting_objective)
    assert len(calls) == len(set(calls))  # nothing evaluated twice
    assert calls[:len(calls_before_resume)] == calls_before_resume
    strip = lambda row: {k: v for k, v in row.items() if k != "cost_s"}  # noqa: E731
    assert strip(resumed["best"]) == strip(straight["best"])
    a = [json.loads(line) for line in open(os.path.join(workdir, search.HISTORY_FILE))]
    b = [json.loads(line) for line in open(tmp_path / "straight" / search.HISTORY_FILE)]
    assert [strip(r) for r in a] == [strip(r) for r in b]
    assert os.path.exists(os.path.join(workdir, "best_reward.png"))
    if algorithm == "reinforce":
        assert os.path.isdir(os.path.join(workdir, "checkpoints"))


def test_history_of_another_run_is_refused(tmp_path):
    config, workdir = _config(tmp_path, seed=1)
    search.train_and_evaluate(dataclasses.replace(config, algorithm="random", budget=5), workdir,
                              space=SPACE, objective=toy_objective)
    lines = open(os.path.join(workdir, search.HISTORY_FILE)).read().splitlines()
    row = json.loads(lines[2])
    row["architecture"] = [1 - row["architecture"][0]] + row["architecture"][1:]
    lines[2] = json.dumps(row)
    open(os.path.join(workdir, search.HISTORY_FILE), "w").write("\n".join(lines) + "\n")
    with pytest.raises(search.HistoryMismatchError, match="Evaluation 2"):
        search.train_and_evaluate(dataclasses.replace(config, algorithm="random", budget=8),
                                  workdir, space=SPACE, objective=toy_objective)


def test_user_defined_space_and_objective_through_the_public_api(tmp_path):
    """A space of 3 decisions with words as choices and a plain function as objective."""
    space = SearchSpace((("activation", ("relu", "tanh", "gelu")), ("width", (8, 16, 32, 64)),
                         ("depth", (1, 2, 3))))

    def objective(architecture):
        values = space.decode(architecture)
        return (values["activation"] == "gelu") + values["width"] / 64 + 0.1 * values["depth"]

    config = search.Config(algorithm="evolution", budget=60, population_size=10,
                           tournament_size=4, seed=3)
    summary = search.train_and_evaluate(config, str(tmp_path), space=space, objective=objective)
    exhaustive = max(objective(a) for a in np.ndindex(*space.num_choices))
    assert summary["best"]["reward"] == pytest.approx(exhaustive)
    assert summary["best"]["values"] == {"activation": "gelu", "width": 64, "depth": 3}
    history = search.read_history(str(tmp_path))
    assert len(history) == 60
    np.testing.assert_allclose(search.best_so_far(history)[-1], exhaustive)


def test_larger_budget_continues_a_finished_reinforce_run(tmp_path):
    """Budget 10 with m = 4 ends on a partial batch; extending to 15 equals a straight 15."""
    config, _ = _config(tmp_path, checkpoint_every=1)
    short = dataclasses.replace(config, budget=10)
    search.train_and_evaluate(short, str(tmp_path / "extended"), space=SPACE,
                              objective=toy_objective)
    long = dataclasses.replace(config, budget=15)
    extended = search.train_and_evaluate(long, str(tmp_path / "extended"), space=SPACE,
                                         objective=toy_objective)
    straight = search.train_and_evaluate(long, str(tmp_path / "straight"), space=SPACE,
                                         objective=toy_objective)
    read = lambda name: [(r.architecture, r.reward)  # noqa: E731
                         for r in search.read_history(str(tmp_path / name))]
    assert read("extended") == read("straight") and len(read("straight")) == 15
    assert extended["best"]["architecture"] == straight["best"]["architecture"]


def test_non_finite_reward_stops_the_search_before_it_is_recorded(tmp_path):
    config, workdir = _config(tmp_path, checkpoint_every=1)
    calls = []

    def objective(architecture):
        calls.append(architecture)
        return float("nan") if len(calls) == 10 else toy_objective(architecture)

    with pytest.raises(FloatingPointError, match="non-finite reward nan") as error:
        search.train_and_evaluate(config, workdir, space=SPACE, objective=objective)
    history = search.read_history(workdir)
    assert f"Evaluation {len(history)} " in str(error.value)
    assert sum(not r.cached for r in history) == 9 and all(np.isfinite(r.reward) for r in history)
    with checkpoints.Checkpoints(workdir, 1) as ckpts:  # every finished controller step saved
        assert ckpts.latest_step() == len(history) // config.architectures_per_step
    resumed = search.train_and_evaluate(config, workdir, space=SPACE, objective=toy_objective)
    assert resumed["evaluations"] == config.budget
