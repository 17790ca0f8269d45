"""`benchmarks/accelerator_check.py` at tiny size on the CPU, so that the script an accelerator
session runs does not rot; and the machine record (`benchmarks/machine.py`) it and the speed
benchmarks write, and the ceilings they divide by (`benchmarks/roofline.py`)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import pytest

from benchmarks import accelerator_check, machine, roofline
from common import cpu_settings
from tests.conftest import run_python

# Two sockets, two hyperthreads per core, one core each: 4 logical CPUs, 2 cores.
CPUINFO = "".join(
    f"processor\t: {i}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
    f"model name\t: Intel(R) Xeon(R) Platinum 8480+\nstepping\t: 8\nphysical id\t: {i // 2}\n"
    f"core id\t\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 amx_tile amx_bf16\n\n"
    for i in range(4))

LSCPU = """Architecture:            x86_64
CPU(s):                  2
Vendor ID:               AuthenticAMD
Model name:              AMD EPYC 9654 96-Core Processor
CPU family:              25
Model:                   17
Stepping:                1
Core(s) per socket:      1
Socket(s):               2
Flags:                   fpu sse4_2 avx avx2 fma avx512f
"""


def test_cpuinfo_gives_model_counts_and_isa_flags():
    cpu = machine.parse_cpuinfo(CPUINFO)
    assert cpu["cpu_model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert (cpu["vendor"], cpu["family"], cpu["model"], cpu["stepping"]) == (
        "GenuineIntel", "6", "143", "8")
    assert (cpu["logical_cpus"], cpu["physical_cores"], cpu["sockets"]) == (4, 2, 2)
    isa = machine.isa_record(cpu["flags"])
    assert isa["avx512f"] and isa["amx_tile"] and isa["avx512_bf16"] and not isa["avx512_fp16"]


def test_lscpu_gives_the_same_fields():
    cpu = machine.parse_lscpu(LSCPU)
    assert cpu["cpu_model"] == "AMD EPYC 9654 96-Core Processor"
    assert (cpu["family"], cpu["model"], cpu["logical_cpus"], cpu["physical_cores"],
            cpu["sockets"]) == ("25", "17", 2, 2, 2)
    isa = machine.isa_record(cpu["flags"])
    assert isa["avx512f"] and not isa["amx_tile"]


def test_machine_record_of_this_machine_is_printable_json():
    record = machine.machine_record()
    assert set(record["isa"]) == set(machine.ISA_FLAGS)
    assert record["avx512"] == record["isa"]["avx512f"] and record["amx"] == record["isa"]["amx_tile"]
    assert record["logical_cpus"] and record["cpu_model"]  # Linux: /proc/cpuinfo
    json.dumps(record)
    assert "AVX-512" in machine.describe(record) and record["cpu_model"] in machine.describe(record)


def test_datasheet_peaks_match_the_device_kind():
    assert accelerator_check.datasheet_peaks("NVIDIA H100 PCIe")["tf32"] == 378e12
    assert accelerator_check.datasheet_peaks("NVIDIA H100 80GB HBM3")["tf32"] == 494.7e12
    assert accelerator_check.datasheet_peaks("NVIDIA H200")["bf16"] == 989.4e12
    assert accelerator_check.datasheet_peaks("cpu") is None


def test_median_rate_leaves_out_the_compiling_interval():
    rows = [{"step": 1, "images_per_s": 1.0}, {"step": 2, "images_per_s": 10.0},
            {"step": 3, "eval": 0.5}, {"step": 4, "images_per_s": 30.0},
            {"step": 5, "images_per_s": 20.0}]
    assert accelerator_check.median_rate(rows, "images_per_s") == (20.0, 3)
    assert accelerator_check.median_rate(rows[:1], "images_per_s") == (1.0, 1)
    assert accelerator_check.median_rate([], "images_per_s") == (None, 0)


def test_part_command_paper_config_then_substitute_then_time_box_then_tiny():
    part = {p.name: p for p in accelerator_check.PARTS}["gan"]
    command = accelerator_check.part_command(part, "/w", tiny=True, minutes=2.0, have_data=False)
    assert command[1:5] == ["-m", "launch.gan",
                            "--flagfile=launch/configs/dcgan_fashion_mnist.flags", "--workdir=/w"]
    flags = command[5:]
    assert flags[0] == "--dataset=digits"  # a substitute flagfile must not undo the tiny flags
    assert flags.index("--max_minutes=2.0") < flags.index("--batch_size=8")
    assert flags[-1] == part.tiny[-1]
    full = accelerator_check.part_command(part, "/w", tiny=False, minutes=3, have_data=True)
    assert "--batch_size=8" not in full and "--dataset=digits" not in full


def test_a_part_without_its_data_or_a_substitute_is_skipped(tmp_path):
    part = accelerator_check.Part("x", "nas", "nas_macro_reinforce.flags", (), (), "steps_per_s",
                                  "figure", needs="no/such/file")
    record = accelerator_check.run_part(part, str(tmp_path), tiny=True, minutes=0.1)
    assert record["returncode"] is None and record["stopped_by"].startswith("skipped")
    assert record["figure"] is None and not (tmp_path / "x").exists()


def test_only_the_launchers_that_apply_them_get_the_cpu_settings():
    environ = cpu_settings.with_settings({"XLA_FLAGS": "--xla_foo=1", "PATH": "/bin"})
    nas = accelerator_check.launcher_env(environ, "nas", tiny=True)
    assert nas["XLA_FLAGS"] == "--xla_foo=1" and "GLIBC_TUNABLES" not in nas
    assert nas["JAX_PLATFORMS"] == "cpu"
    for launcher in ("gan", "maml", "learned_optimizer"):
        env = accelerator_check.launcher_env(environ, launcher, tiny=False)
        assert cpu_settings.XLA_FLAG in env["XLA_FLAGS"] and "JAX_PLATFORMS" not in env
        assert env["GLIBC_TUNABLES"] == cpu_settings.GLIBC_TUNABLE


@pytest.mark.slow
def test_tiny_accelerator_check_runs_every_part_on_the_cpu(tmp_path):
    out = tmp_path / "accelerator.json"
    run_python(["-m", "benchmarks.accelerator_check", "--tiny", f"--out={out}",
                f"--runs_dir={tmp_path / 'runs'}"], timeout=1200)
    result = json.loads(out.read_text())
    assert result["mode"] == "tiny" and result["devices"]["platform"] == "cpu"
    assert result["machine"]["cpu_model"] and "avx512f" in result["machine"]["isa"]
    assert set(result["parts"]) == {p.name for p in accelerator_check.PARTS}
    skipped = {name for name, part in result["parts"].items()
               if part["stopped_by"].startswith("skipped")}  # data absent, no substitute
    assert skipped <= {"nas_macro"}
    for name, part in result["parts"].items():
        if name in skipped:
            continue
        assert part["returncode"] == 0 and part["stopped_by"] == "finished", (name, part)
        assert os.path.basename(part["command"].split("--flagfile=")[1].split()[0]) == \
            part["paper_config"]
    expected = {"gan_images_per_s", "lo_meta_steps_per_s", "maml_tasks_per_s",
                "nas_children_per_hour", "nas_macro_evaluations_per_s", "gan_step_images_per_s",
                "gan_step_fraction_of_matmul", "gan_step_fraction_of_datasheet_peak"}
    if skipped:
        expected.discard("nas_macro_evaluations_per_s")
    assert expected <= set(result["figures"])
    for key in expected - {"gan_step_fraction_of_datasheet_peak"}:
        value = result["figures"][key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert 0 < result["gan_step"]["fraction_of_matmul"] < 10


def test_roofline_counts_a_matmul_and_times_a_positive_peak():
    """The ceilings every speed benchmark divides by: XLA's count of an n x n x n product is
    2 n³ FLOPs, and the timed peak and bandwidth are positive and finite."""
    n = 64
    a = jnp.ones((n, n), jnp.float32)
    cost = roofline.compiled_cost(jax.jit(jnp.matmul).lower(a, a).compile())
    assert cost["flops"] == 2 * n ** 3 and cost["bytes"] >= 3 * n * n * 4
    for figure in (roofline.matmul_peak_flops(n, repeats=1), roofline.copy_bandwidth(1, 1)):
        assert 0 < figure < float("inf")
