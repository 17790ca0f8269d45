"""One set of defaults: each `launch/configs/nas_macro_*.flags` is `nas.train.Config()` with only
the algorithm, space, budget and logging set -- the settings `benchmarks/nas_macro.py` reports."""

import glob
import json
import os

from benchmarks import nas_macro
from common import config as config_lib
from nas import train
from tests.conftest import REPO, run_python

# Prints the config each flag file builds, as `python -m launch.nas --flagfile=...` would.
PARSE = """
import json, sys
from common import config as config_lib
from launch import flags as launch_flags
from launch import nas
for path in sys.argv[1:]:
    launch_flags.parse_flagfile(path)
    print(json.dumps(config_lib.to_dict(nas.make_config())))
"""
RUN_SETTINGS = ("algorithm", "space", "budget", "log_every")


def test_macro_flag_files_are_the_defaults_the_benchmark_reports():
    paths = sorted(glob.glob(os.path.join(REPO, "launch", "configs", "nas_macro_*.flags")))
    assert len(paths) == len(train.ALGORITHMS)
    configs = [json.loads(line) for line in run_python(["-c", PARSE, *paths]).stdout.split("\n")
               if line.startswith("{")]
    defaults = config_lib.to_dict(nas_macro.DEFAULTS)
    assert {c["algorithm"] for c in configs} == set(train.ALGORITHMS)
    for config in configs:
        assert {k: v for k, v in config.items() if k not in RUN_SETTINGS} == {
            k: v for k, v in defaults.items() if k not in RUN_SETTINGS}
        assert config["budget"] == max(nas_macro.BUDGETS)
        assert nas_macro.configure(config["algorithm"]) == train.Config(
            algorithm=config["algorithm"], space="nas_bench_macro")
    assert defaults == config_lib.to_dict(train.Config(space="nas_bench_macro"))
