"""benchmarks.learned_optimizer: seeds added to a row later equal the row over all seeds at once."""

import numpy as np
import pytest

from benchmarks import learned_optimizer_rows as benchmark

BASELINES = {"sgd": 0.69, "nag": 0.52, "rmsprop": 0.645, "adam": 0.604}
# Each seed's LSTM test loss, its rank among the five written out by hand, and its baselines
# (evaluated on another machine, the third seed's RMSprop came out a little lower).
SEEDS = [(0.50, 1, BASELINES), (0.53, 2, BASELINES), (0.62, 3, {**BASELINES, "rmsprop": 0.641})]


def _evaluation(lstm: float, rank: int, baselines: dict, learning_rate: float = 0.01) -> dict:
    """The part of a run's eval.json that `quality_rows` reads, one family, horizon 100."""
    losses = {"lstm": lstm, **baselines}
    return {"families": {"mlp": {
        "stats": {name: {"100": {"mean": loss}} for name, loss in losses.items()},
        "comparison": {"100": {"ratio_lstm_to_adam": lstm / baselines["adam"],
                               "rank": {"lstm": rank}}},
        "learning_rates": {"adam": learning_rate}}}}


def _row(seeds, runs, tmp_path) -> dict:
    rows = benchmark.quality_rows("c", seeds, runs, [10] * len(seeds), str(tmp_path), "cpu",
                                  "loss")
    return rows["c/mlp/100"]


@pytest.mark.parametrize("first", [1, 2])
def test_seeds_added_later_equal_the_row_over_all_seeds(first, tmp_path):
    runs = [_evaluation(*seed) for seed in SEEDS]
    together = _row([0, 1, 2], runs, tmp_path)
    added = benchmark.rows_with_added_seeds(_row(list(range(first)), runs[:first], tmp_path),
                                            _row(list(range(first, 3)), runs[first:], tmp_path))
    assert added["seeds"] == [0, 1, 2] and added["meta_steps"] == [10, 10, 10]
    np.testing.assert_allclose(added["ratio_per_seed"], together["ratio_per_seed"])
    stats = [added["ratio_lstm_to_adam"], added["lstm_rank"], *added["mean_final_loss"].values()]
    expected = [together["ratio_lstm_to_adam"], together["lstm_rank"],
                *[together["mean_final_loss"][name] for name in added["mean_final_loss"]]]
    assert [s["n"] for s in stats] == [3] * len(stats)
    np.testing.assert_allclose([[s["mean"], s["sd"]] for s in stats],
                               [[s["mean"], s["sd"]] for s in expected], atol=1e-12)
    assert added["mean_final_loss"]["rmsprop"]["sd"] > 0


def test_seeds_are_not_added_to_a_row_tuned_otherwise_or_of_the_same_seeds(tmp_path):
    first = _row([0], [_evaluation(*SEEDS[0])], tmp_path)
    with pytest.raises(ValueError, match="learning rates differ"):
        benchmark.rows_with_added_seeds(first, _row([1], [_evaluation(*SEEDS[1], 0.1)], tmp_path))
    with pytest.raises(ValueError, match="overlap"):
        benchmark.rows_with_added_seeds(first, _row([0], [_evaluation(*SEEDS[1])], tmp_path))
