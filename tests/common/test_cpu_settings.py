"""The CPU settings of the GAN and MAML launchers: added to the environment unless set, applied by
restarting, and applied by exactly the launchers `cpu_settings.LAUNCHERS` names."""

import os
import pathlib
import subprocess
import sys

from common import cpu_settings


def test_settings_are_added_unless_the_user_set_them():
    env = cpu_settings.with_settings({"XLA_FLAGS": "--xla_dump_to=/tmp/x", "PATH": "/bin"})
    assert env["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {cpu_settings.XLA_FLAG}"
    assert env["GLIBC_TUNABLES"] == cpu_settings.GLIBC_TUNABLE and env["PATH"] == "/bin"
    own = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=",
           "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=1"}
    assert cpu_settings.with_settings(own) == own
    assert cpu_settings.with_settings({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"})[
        "GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=1:{cpu_settings.GLIBC_TUNABLE}"


SCRIPT = """
import os, sys
sys.path.insert(0, {repo!r})
print("start", os.getpid(), flush=True)
from common import cpu_settings
cpu_settings.apply_before_jax()
print("env", os.getpid(), os.environ.get("GLIBC_TUNABLES"), os.environ.get("XLA_FLAGS"))
"""


def test_apply_before_jax_restarts_the_process_once_with_the_settings(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(repo=os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))))
    plain = cpu_settings.without_settings(os.environ)
    del plain[cpu_settings.OPT_OUT]
    out = subprocess.run([sys.executable, str(script)], env=plain, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    starts = [line.split()[1] for line in out if line.startswith("start")]
    assert len(starts) == 2 and starts[0] == starts[1]  # re-executed in place, once
    assert [line for line in out if line.startswith("env")] == [
        f"env {starts[0]} {cpu_settings.GLIBC_TUNABLE} {cpu_settings.XLA_FLAG}"]
    out = subprocess.run([sys.executable, str(script)],
                         env=cpu_settings.without_settings(os.environ), capture_output=True,
                         text=True, check=True).stdout.split("\n")
    assert len([line for line in out if line.startswith("start")]) == 1
    assert [line.split()[2:] for line in out if line.startswith("env")] == [["None", "None"]]


def test_the_launchers_that_apply_the_settings_are_the_ones_listed():
    """`cpu_settings.LAUNCHERS` (which `benchmarks/accelerator_check.py` trusts) names exactly the
    launchers whose `__main__` applies the settings."""
    launch_dir = pathlib.Path(__file__).resolve().parents[2] / "launch"
    applying = {path.stem for path in launch_dir.glob("*.py")
                if "cpu_settings.apply_before_jax()" in path.read_text()}
    assert applying == set(cpu_settings.LAUNCHERS)
