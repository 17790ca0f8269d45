"""Process settings under which the GAN's, the few-shot learners' and the learned optimizer's steps
run faster on XLA's CPU backend; `launch/gan.py`, `launch/maml.py` and `launch/learned_optimizer.py`
apply them.

Both must be in place before JAX starts, so those launchers call `apply_before_jax()` before
importing anything that imports JAX (this module imports neither JAX nor NumPy):

* `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION`
  routes convolutions to XLA's Eigen kernels rather than YNNPACK, faster for the DCGAN's shapes
  and for the Conv4 of Prototypical Networks and the pretrained baseline. (MAML's convolutions
  are matrix products on CPU, `maml.models.PatchConv`, which the flag does not touch.)
* `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` makes malloc ask for transparent huge pages
  (`madvise`), so the steps' large temporary buffers, freed and allocated again every step, are
  not page-faulted in 4 KiB at a time on every step. glibc reads it only when a process starts,
  so `apply_before_jax` re-executes the interpreter with the same command line (same pid).

A user's own value of either variable wins; `L2GL_CPU_SETTINGS=0` turns both off.
`benchmarks/gan_speed.py` measures the DCGAN step with and without them; benchmarks/README.md has
the few-shot and learned-optimizer figures.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
GLIBC_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "L2GL_CPU_SETTINGS"
VARIABLES = ("XLA_FLAGS", "GLIBC_TUNABLES")  # the environment variables they set
LAUNCHERS = ("gan", "maml", "learned_optimizer")  # the launchers that apply them


def with_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of `environ` with the flag added to XLA_FLAGS and the tunable to GLIBC_TUNABLES,
    each unless the variable already sets it."""
    env = dict(environ)
    for name, setting, separator in (("XLA_FLAGS", XLA_FLAG, " "),
                                     ("GLIBC_TUNABLES", GLIBC_TUNABLE, ":")):
        if setting.split("=")[0] not in env.get(name, ""):
            env[name] = separator.join(filter(None, (env.get(name, ""), setting)))
    return env


def without_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of `environ` in which neither setting is applied (the opt-out set)."""
    env = {k: v for k, v in environ.items() if k not in VARIABLES}
    return {**env, OPT_OUT: "0"}


def recorded(environ: Mapping[str, str]) -> dict[str, str | None]:
    """Both variables as `environ` has them (None when unset), for a benchmark's results."""
    return {name: environ.get(name) for name in VARIABLES}


def apply_before_jax() -> None:
    """Sets XLA_FLAGS in this process; restarts it with GLIBC_TUNABLES when that is missing."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return
    env = with_settings(os.environ)
    os.environ["XLA_FLAGS"] = env["XLA_FLAGS"]
    if env["GLIBC_TUNABLES"] != os.environ.get("GLIBC_TUNABLES") and _restartable():
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)


def _restartable() -> bool:
    """glibc, JAX not imported yet, and a command line that can run again (a script or -m
    module, not -c or stdin)."""
    return (platform.libc_ver()[0] == "glibc" and "jax" not in sys.modules
            and os.path.isfile(sys.argv[0]))
