"""The ceilings a compiled step is measured against: the matmul peak and the copy bandwidth of
this machine (timed with JAX, here and now), and XLA's count of a compiled step's FLOPs and bytes.

A step's fraction of the peak is (its FLOPs / its seconds) / `matmul_peak_flops()`, timed in the
same process: the peak of a shared or throttled machine moves with the step's speed.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def best_seconds(fn, *args, repeats: int = 5) -> float:
    """The fastest of `repeats` calls of `fn(*args)`, each until its output is ready, after one
    untimed call (the compilation)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` float32 n x n x n matrix products (2 n³ FLOPs each)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    return 2.0 * n ** 3 / best_seconds(jax.jit(jnp.matmul), a, b, repeats=repeats)


def copy_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes/s of the fastest of `repeats` in-place passes x <- x + 1 over a float32 array of `mib`
    MiB (read + write: 2 x its size; the buffer donated, so no page faults of a fresh one)."""
    x = jnp.ones((mib * 2**18,), jnp.float32)
    bump = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    x = jax.block_until_ready(bump(x))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x = jax.block_until_ready(bump(x))
        best = min(best, time.perf_counter() - start)
    return 2 * x.nbytes / best


def compiled_cost(compiled) -> dict[str, float]:
    """XLA's cost analysis of a compiled function (`jax.jit(f).lower(...).compile()`): {flops,
    bytes} (NaN where the backend does not count)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost.get("flops", float("nan"))),
            "bytes": float(cost.get("bytes accessed", float("nan")))}
