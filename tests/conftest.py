"""Shared test fixtures: where the real data lives, and running launchers in subprocesses."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def shared_data(*parts: str) -> str:
    """Path of a file under ../shared/data, or skip the test with the reason."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"real data not present: {path} (see ../shared/data/README.md)")
    return path


def run_python(args, env_extra=None, timeout=600, check=True, **kwargs):
    """Runs `python <args>` from the repo root in a fresh interpreter; returns CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=REPO, **(env_extra or {}))
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"python {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc
