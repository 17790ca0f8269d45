"""The machine a benchmark ran on, for its JSON and its printout: CPU model name, vendor, logical
CPUs and physical cores, family/model/stepping (which tell CPU generations apart when the model
name does not, e.g. a VM's "AMD EPYC"), the ISA flags that decide which kernels XLA and oneDNN can use (AVX2,
AVX-512, AMX, ...), the CPUs this process may run on, and the OS and Python.

Read from `/proc/cpuinfo` (Linux), else from `lscpu`'s output; fields neither gives are None.
Imports no JAX, so a benchmark can record the machine before its CPU settings start JAX.

    from benchmarks import machine
    record = machine.machine_record()      # {"cpu_model": ..., "isa": {"avx512f": True, ...}}
    print(machine.describe(record))
"""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

# The ISA flags recorded, as /proc/cpuinfo names them.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16",
             "amx_int8")


def _key_values(text: str, separator: str = ":") -> list[tuple[str, str]]:
    """(key, value) of each `key <separator> value` line, both stripped."""
    pairs = []
    for line in text.splitlines():
        key, found, value = line.partition(separator)
        if found:
            pairs.append((key.strip(), value.strip()))
    return pairs


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """CPU fields of a /proc/cpuinfo text: model name and vendor of the first processor, logical
    CPUs (one `processor` entry each), physical cores (distinct (physical id, core id) pairs),
    sockets (distinct physical ids) and the first processor's flags."""
    pairs = _key_values(text)
    first = {}
    for key, value in pairs:
        first.setdefault(key, value)
    logical = sum(1 for key, _ in pairs if key == "processor")
    cores, sockets, physical = set(), set(), None
    for key, value in pairs:
        if key == "physical id":
            physical = value
            sockets.add(value)
        elif key == "core id":
            cores.add((physical, value))
    return {"cpu_model": first.get("model name") or first.get("cpu model"),
            "vendor": first.get("vendor_id"), "family": first.get("cpu family"),
            "model": first.get("model"), "stepping": first.get("stepping"),
            "logical_cpus": logical or None,
            "physical_cores": len(cores) or None,
            "sockets": len(sockets) or None,
            "flags": set(first.get("flags", "").split())}


def parse_lscpu(text: str) -> dict[str, Any]:
    """The same fields from `lscpu`'s output (physical cores = cores per socket x sockets)."""
    fields = dict(_key_values(text))
    sockets = int(fields["Socket(s)"]) if fields.get("Socket(s)", "").isdigit() else None
    per_socket = fields.get("Core(s) per socket", "")
    cores = int(per_socket) * sockets if per_socket.isdigit() and sockets else None
    logical = fields.get("CPU(s)", "")
    return {"cpu_model": fields.get("Model name"), "vendor": fields.get("Vendor ID"),
            "family": fields.get("CPU family"), "model": fields.get("Model"),
            "stepping": fields.get("Stepping"),
            "logical_cpus": int(logical) if logical.isdigit() else None,
            "physical_cores": cores, "sockets": sockets,
            "flags": set(fields.get("Flags", "").split())}


def read_cpu() -> dict[str, Any]:
    """`parse_cpuinfo` of /proc/cpuinfo, else `parse_lscpu` of `lscpu`, else no CPU fields."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = parse_cpuinfo(f.read())
        cpu["source"] = "/proc/cpuinfo"
        if cpu["cpu_model"] or cpu["flags"]:
            return cpu
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=True)
        return {**parse_lscpu(out.stdout), "source": "lscpu"}
    except (OSError, subprocess.SubprocessError):
        return {"cpu_model": None, "vendor": None, "family": None, "model": None,
                "stepping": None, "logical_cpus": None, "physical_cores": None,
                "sockets": None, "flags": set(), "source": None}


def isa_record(flags: set[str]) -> dict[str, bool]:
    """Which of `ISA_FLAGS` the CPU has."""
    return {name: name in flags for name in ISA_FLAGS}


def usable_cpus() -> int | None:
    """CPUs this process may run on (its affinity mask), which a container may restrict below
    the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def machine_record() -> dict[str, Any]:
    """The machine for a benchmark's JSON: CPU (model, vendor, counts, ISA flags with the summary
    booleans `avx512` = avx512f and `amx` = amx_tile), usable CPUs, OS, Python, load average."""
    cpu = read_cpu()
    isa = isa_record(cpu.pop("flags"))
    return {**cpu, "isa": isa, "avx512": isa["avx512f"], "amx": isa["amx_tile"],
            "os_cpu_count": os.cpu_count(), "usable_cpus": usable_cpus(),
            "platform": platform.platform(), "machine": platform.machine(),
            "python": platform.python_version(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def describe(record: dict[str, Any]) -> str:
    """One line: `<model> (family f model m) | <logical> logical CPUs, <cores> cores, <usable>
    usable | AVX-512 yes, AMX no | <flags present>`."""
    def yes(flag: bool) -> str:
        return "yes" if flag else "no"
    present = " ".join(name for name, has in record["isa"].items() if has) or "none recorded"
    return (f"{record['cpu_model'] or 'unknown CPU'} (family {record['family']} model "
            f"{record['model']}) | {record['logical_cpus']} logical CPUs, "
            f"{record['physical_cores']} cores, {record['usable_cpus']} usable | "
            f"AVX-512 {yes(record['avx512'])}, AMX {yes(record['amx'])} | {present}")
