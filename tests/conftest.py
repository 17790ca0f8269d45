"""Shared test fixtures: where the real data lives, and running launchers in subprocesses."""

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

# Most of the suite's time is XLA compiling small programs; LLVM's optimisation passes are the
# larger part of that (about 40% of a MAML meta-gradient's compile time) and buy nothing at the
# tests' sizes. The same programs, compiled with fewer optimisations, for this process and every
# launcher a test starts (set before JAX initialises its backend).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, (os.environ.get("XLA_FLAGS"), TEST_XLA_FLAGS)))

# One persistent compilation cache for the whole session, in this process, in both pytest-xdist
# workers (which inherit the variable from the controller) and in every launcher a test starts:
# a program compiled once (a tiny config's step, built again by another test or after a kill) is
# loaded instead of compiled again. Set before JAX is imported; removed when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="l2gl-tests-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def pytest_collection_modifyitems(items):
    """The tests marked slow first: pytest-xdist hands the first tests out in turn, so both
    workers start on the long ones and share the short ones at the end, rather than one worker
    finishing a long test alone while the other waits."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def shared_data(*parts: str) -> str:
    """Path of a file under ../shared/data, or skip the test with the reason."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"real data not present: {path} (see ../shared/data/README.md)")
    return path


def subprocess_env(env_extra=None) -> dict[str, str]:
    """This environment for a launcher, plus `env_extra`; XLA_FLAGS are added to, not replaced."""
    env = dict(os.environ, PYTHONPATH=REPO, **(env_extra or {}))
    if env_extra and "XLA_FLAGS" in env_extra:
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {env_extra['XLA_FLAGS']}".strip()
    return env


def run_python(args, env_extra=None, timeout=600, check=True, **kwargs):
    """Runs `python <args>` from the repo root in a fresh interpreter; returns CompletedProcess."""
    env = subprocess_env(env_extra)
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"python {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(args, num_processes: int = 2, timeout=400, env_extra=None) -> list[str]:
    """Runs `python <args>` as `num_processes` processes of one `jax.distributed` run on localhost
    (gloo collectives); asserts they all succeed and returns each one's output."""
    port = free_port()
    env = subprocess_env(env_extra)
    common = [*args, f"--num_processes={num_processes}", f"--coordinator_address=localhost:{port}",
              "--distributed_timeout=120"]
    procs = [subprocess.Popen([sys.executable, *common, f"--process_id={i}"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(num_processes)]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    codes = [p.returncode for p in procs]
    assert codes == [0] * num_processes, "\n\n".join(o[-3000:] for o in outputs)
    return outputs


def kill_when_exists(args, path, timeout=300, env_extra=None) -> int:
    """Starts `python <args>`, sends it SIGKILL as soon as `path` exists (e.g. a checkpoint
    directory), and returns its exit code (0 if it finished before the kill landed)."""
    env = subprocess_env(env_extra)
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not os.path.exists(path) and proc.poll() is None:
        assert time.time() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def logged_fingerprint(output: str) -> str:
    """The last `Parameter fingerprint at step N: <digest>` a launcher logged."""
    found = re.findall(r"Parameter fingerprint at step \d+: (\S+)", output)
    assert found, f"no parameter fingerprint in the output:\n{output[-3000:]}"
    return found[-1]
