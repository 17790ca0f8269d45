"""Search spaces: decoding, the CNN space, NAS-Bench-Macro's protocol."""

import json
import os

import numpy as np
import pytest

from nas import search_space
from nas.search_space import SearchSpace

MACRO = os.path.normpath(search_space.DEFAULT_MACRO_PATH)


def test_space_decodes_checks_and_counts():
    space = SearchSpace((("a", (0, 1)), ("b", ("x", "y", "z"))))
    assert space.size == 6 and space.num_choices == (2, 3) and space.names == ("a", "b")
    assert space.decode((1, 2)) == {"a": 1, "b": "z"}
    assert not space.contains((2, 0)) and not space.contains((0,))
    with pytest.raises(ValueError, match="not in the space"):
        space.decode((0, 3))
    with pytest.raises(ValueError, match="unique"):
        SearchSpace((("a", (0,)), ("a", (1,))))


def test_cnn_space_layout():
    space = search_space.cnn_space(2)
    assert len(space) == 8 and space.size == (4 * 4 * 4 * 2) ** 2
    assert space.names[:4] == ("0/filter_height", "0/filter_width", "0/num_filters", "0/stride")
    assert search_space.cnn_layers(space, (0, 3, 1, 1, 2, 1, 3, 0)) == ((1, 7, 36, 2),
                                                                        (5, 3, 64, 1))


def test_macro_benchmark_missing_file_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(search_space, "DEFAULT_MACRO_PATH", str(tmp_path / "absent.json"))
    with pytest.raises(FileNotFoundError, match="nowhere") as error:
        search_space.MacroBenchmark(str(tmp_path / "nowhere"))
    assert "absent.json" in str(error.value) and "--data_dir" in str(error.value)


def test_macro_benchmark_reads_a_given_file(tmp_path):
    table = {"".join(map(str, a)): {"test_acc": [80.0 + sum(a), 70.0, 72.0], "mean_acc": 0,
                                    "std": 0, "params": 1, "flops": 2}
             for a in np.ndindex(*(3,) * 8)}
    (tmp_path / search_space.MACRO_FILE).write_text(json.dumps(table))
    bench = search_space.MacroBenchmark(str(tmp_path))
    reward, info = bench((2, 2, 2, 2, 2, 2, 2, 1))
    assert reward == pytest.approx(0.95) and info["test_accuracy"] == pytest.approx(71.0)
    assert bench.oracle() == ((2,) * 8, pytest.approx(71.0))


@pytest.mark.skipif(not os.path.exists(MACRO), reason=f"NAS-Bench-Macro not at {MACRO}")
def test_real_macro_benchmark_oracle_is_93_05():
    bench = search_space.MacroBenchmark()
    with open(MACRO) as f:
        table = json.load(f)
    best = max(table, key=lambda k: table[k]["test_acc"][0])
    architecture, test_accuracy = bench.oracle()
    assert "".join(map(str, architecture)) == best
    assert test_accuracy == pytest.approx(np.mean(table[best]["test_acc"][1:]))
    assert round(test_accuracy, 2) == 93.05
