"""Where a compiled JAX step spends its time: seconds per XLA instruction from a profiler trace.

`op_profile(run, compiled_text, steps)` traces `run()` (which runs the compiled step `steps` times
and waits for it) with `jax.profiler`, reads the trace's xplane (TensorFlow's protobuf, installed
with the `[bench]` extra) and sums each instruction's events, attributing them through the compiled
module's text to an HLO opcode, a shape and the JAX op that produced them.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from typing import Callable


def hlo_ops(hlo_text: str) -> dict[str, dict]:
    """{instruction name: {hlo opcode, shape, source op}} of a compiled module's instructions."""
    ops = {}
    for match in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$", hlo_text,
                             re.MULTILINE):
        name, shape, opcode, rest = match.groups()
        source = re.search(r'op_name="([^"]*)"', rest)
        ops[name] = {"hlo": opcode, "shape": shape[:60],
                     "source": source.group(1).split("/")[-1][:40] if source else ""}
    return ops


def op_profile(run: Callable[[], None], compiled_text: str, steps: int,
               top: int | None = 15) -> list[dict]:
    """The `top` instructions by time (all with None): [{op, ms_per_step, fraction, hlo, shape,
    source}]."""
    import jax
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            run()
        path = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0]
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
    ops = hlo_ops(compiled_text)
    totals: dict[str, float] = {}
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if name in ops:
                    totals[name] = totals.get(name, 0.0) + event.duration_ps * 1e-9 / steps
    step_ms = sum(totals.values())
    return [{"op": name, "ms_per_step": ms, "fraction": ms / step_ms, **ops[name]}
            for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:top]]


def by_kind(ops: list[dict], top: int = 10) -> list[dict]:
    """`op_profile(..., top=None)` summed by (HLO opcode, source op): [{kind, ms_per_step,
    fraction, count}], the largest first."""
    kinds: dict[str, dict] = {}
    total = sum(op["ms_per_step"] for op in ops)
    for op in ops:
        kind = kinds.setdefault(f"{op['hlo']} ({op['source']})", {"ms_per_step": 0.0, "count": 0})
        kind["ms_per_step"] += op["ms_per_step"]
        kind["count"] += 1
    rows = [{"kind": k, **v, "fraction": v["ms_per_step"] / total} for k, v in kinds.items()]
    return sorted(rows, key=lambda r: -r["ms_per_step"])[:top]
