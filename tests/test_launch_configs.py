"""Every committed `launch/configs/*.flags` parses with its launcher and builds a valid config, so a
typo in a flag file fails here rather than when a researcher starts a long run."""

import glob
import os

import pytest

from tests.conftest import REPO, run_python

LAUNCHER_OF_PREFIX = {"demo": "gan", "dcgan_": "gan", "goodfellow_": "gan",
                      "lstm_": "learned_optimizer", "maml_": "maml", "nas_": "nas"}
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "launch", "configs", "*.flags")))

# Parses each flag file as `python -m launch.<method> --flagfile=...` would, then builds and
# validates the method's config; prints one line per file.
PARSE_ALL = """
import importlib, sys
from launch import flags as launch_flags
launcher = importlib.import_module("launch." + sys.argv[1])
for path in sys.argv[2:]:
    launch_flags.parse_flagfile(path)
    launcher.make_config().validate()
    print("valid", path)
"""


def launcher_of(path: str) -> str:
    name = os.path.basename(path)
    matches = [m for prefix, m in LAUNCHER_OF_PREFIX.items() if name.startswith(prefix)]
    assert len(matches) == 1, f"{name}: no launcher is known for it; add its prefix above."
    return matches[0]


def test_every_config_file_has_a_launcher():
    assert len(CONFIG_FILES) > 20
    assert {launcher_of(p) for p in CONFIG_FILES} == set(LAUNCHER_OF_PREFIX.values())


@pytest.mark.parametrize("method", sorted(set(LAUNCHER_OF_PREFIX.values())))
def test_config_files_parse_and_validate(method):
    paths = [p for p in CONFIG_FILES if launcher_of(p) == method]
    proc = run_python(["-c", PARSE_ALL, method, *paths])
    assert proc.stdout.split() == [word for p in paths for word in ("valid", p)]
