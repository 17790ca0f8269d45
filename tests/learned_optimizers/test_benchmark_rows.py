"""benchmarks.learned_optimizer: seeds added to a row later equal the row over all seeds at once."""

import numpy as np
import pytest

from benchmarks import learned_optimizer_rows as benchmark

BASELINES = {"sgd": 0.69, "nag": 0.52, "rmsprop": 0.645, "adam": 0.604}
# Each seed's LSTM test loss and, written out by hand, its rank among the five.
LSTM = [(0.50, 1), (0.53, 2), (0.62, 3)]


def _evaluation(lstm: float, rank: int, baselines=BASELINES) -> dict:
    """The part of a run's eval.json that `quality_rows` reads, one family, horizon 100."""
    losses = {"lstm": lstm, **baselines}
    return {"families": {"mlp": {
        "stats": {name: {"100": {"mean": loss}} for name, loss in losses.items()},
        "comparison": {"100": {"ratio_lstm_to_adam": lstm / baselines["adam"],
                               "rank": {"lstm": rank}}},
        "learning_rates": {"adam": 0.01}}}}


def _row(seeds, runs, tmp_path) -> dict:
    rows = benchmark.quality_rows("c", seeds, runs, [10] * len(seeds), str(tmp_path), "cpu",
                                  "loss")
    return rows["c/mlp/100"]


def test_seeds_added_later_equal_the_row_over_all_seeds(tmp_path):
    runs = [_evaluation(*seed) for seed in LSTM]
    together = _row([0, 1, 2], runs, tmp_path)
    added = benchmark.rows_with_added_seeds(_row([0, 1], runs[:2], tmp_path),
                                            _row([2], runs[2:], tmp_path))
    assert added["seeds"] == [0, 1, 2]
    np.testing.assert_allclose(added["ratio_per_seed"], together["ratio_per_seed"])
    for field in ("ratio_lstm_to_adam", "lstm_rank"):
        assert added[field]["n"] == 3
        np.testing.assert_allclose([added[field]["mean"], added[field]["sd"]],
                                   [together[field]["mean"], together[field]["sd"]])
    np.testing.assert_allclose(added["mean_final_loss"]["lstm"]["mean"], np.mean(
        [loss for loss, _ in LSTM]))


def test_seeds_are_not_added_to_a_row_evaluated_otherwise(tmp_path):
    other = {**BASELINES, "nag": 0.51}
    with pytest.raises(ValueError, match="nag's test loss differs"):
        benchmark.rows_with_added_seeds(_row([0], [_evaluation(*LSTM[0])], tmp_path),
                                        _row([1], [_evaluation(*LSTM[1], other)], tmp_path))
    with pytest.raises(ValueError, match="overlap"):
        benchmark.rows_with_added_seeds(_row([0], [_evaluation(*LSTM[0])], tmp_path),
                                        _row([0], [_evaluation(*LSTM[1])], tmp_path))
