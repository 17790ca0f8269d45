"""Evaluation statistics against numpy by hand."""

import numpy as np

from learned_optimizers import evaluate


def test_summaries_ratio_and_ranks():
    curves = {"lstm": np.array([[9.0, 1.0, 0.01], [9.0, 3.0, 0.1]]),
              "adam": np.array([[9.0, 2.0, 0.2], [9.0, 2.0, 0.2]]),
              "sgd": np.array([[9.0, 5.0, np.inf], [9.0, 4.0, 1.0]])}
    stats = {name: evaluate.summarize(c, [1, 2]) for name, c in curves.items()}
    assert stats["lstm"]["1"] == {"mean": 2.0, "median": 2.0,
                                  "log10_mean": np.mean(np.log10([1.0, 3.0]))}
    np.testing.assert_allclose(stats["lstm"]["2"]["log10_mean"], -1.5)
    comparison = evaluate.compare(stats, [1, 2])
    assert comparison["1"]["ratio_lstm_to_adam"] == 1.0
    np.testing.assert_allclose(comparison["2"]["ratio_lstm_to_adam"], 0.055 / 0.2)
    assert comparison["2"]["rank"] == {"lstm": 1, "adam": 2, "sgd": 3}
    assert comparison["1"]["rank"]["sgd"] == 3
