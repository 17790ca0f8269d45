"""One time-boxed check of every launcher, and the GAN step's speed, on whatever JAX finds.

    python -m benchmarks.accelerator_check                # about --minutes per part (default 3)
    python -m benchmarks.accelerator_check --minutes=1 --parts=gan,maml
    python -m benchmarks.accelerator_check --tiny         # CPU, tiny sizes: the check CI runs

Writes `benchmarks/results/accelerator_<platform>.json` (or `--out`).

Launcher parts: each launcher's paper config runs through its own command line,
`python -m launch.<method> --flagfile=launch/configs/<paper>.flags --workdir=<tmp>` with a few
overrides that keep it inside the time box (no final evaluation; `--max_minutes` where the
launcher has it); a run still going at the time box gets SIGTERM (the launchers checkpoint and
exit), and SIGKILL a minute later. Its figure is the median of the rates the launcher logged
into `metrics.jsonl` over its logged intervals, the first interval (which holds the compilation)
left out when there are others:

* `gan`: the TensorFlow tutorial's DCGAN (`dcgan_fashion_mnist.flags`): images/s.
* `learned_optimizer`: the LSTM optimizer on the paper's 28x28 MNIST MLP (`lstm_mlp_mnist28.flags`):
  meta-steps/s.
* `maml`: Omniglot 5-way 1-shot (`maml_omniglot_5way1shot.flags`): tasks/s.
* `nas_cnn`: REINFORCE over CNNs trained on Fashion-MNIST (`nas_cnn_fashion_mnist.flags`):
  children/hour (child trainings, i.e. evaluations, per hour).
* `nas_macro`: REINFORCE on NAS-Bench-Macro's table (`nas_macro_reinforce.flags`): evaluations/s.

A part whose data is missing runs on what is at hand instead and says so (`substitute`): the
digits for Fashion-MNIST, the quadratics for MNIST, the sinusoids for Omniglot; `nas_macro`
without NAS-Bench-Macro's table is skipped (`stopped_by`). `--tiny` runs
every part at a tiny size on the CPU (JAX_PLATFORMS=cpu), the substitutes included: its figures
check that the script works, not speed.

GAN step speed (`gan_step`): the tutorial's train step at batch 256 (`benchmarks.gan_speed`),
timed after a warm-up: images/s, its FLOPs (XLA's cost analysis), the achieved FLOP/s against an
n x n x n fp32 matmul's measured FLOP/s, and against the device's datasheet peaks where the device
kind is known (`DATASHEET_PEAK_FLOPS`; on GPUs fp32 matmuls run as TF32 at JAX's default
precision, so the TF32 peak is the relevant one).

The JSON holds the machine (`benchmarks/machine.py`: CPU model, cores, ISA flags), the devices,
the versions, each part's command, exit status, seconds and rates, and the headline `figures`.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

if __name__ == "__main__":  # before JAX starts: the CPU settings of cpu_settings.LAUNCHERS
    from common import cpu_settings
    cpu_settings.apply_before_jax()

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import gan_speed, machine, roofline  # noqa: E402
from common import data, metrics  # noqa: E402
from common import cpu_settings  # noqa: E402

flags.DEFINE_bool("tiny", False, "Every part at a tiny size on the CPU (the CI check).")
flags.DEFINE_float("minutes", 3.0, "Time box of each launcher part, in minutes.")
flags.DEFINE_list("parts", None, "Parts to run (default: all launcher parts and gan_step).")
flags.DEFINE_string("out", None,
                    "Where to write the JSON (default: benchmarks/results/accelerator_<platform>"
                    ".json).")
flags.DEFINE_string("runs_dir", None, "Where the launchers' workdirs go (default: a temporary "
                    "directory, deleted).")
FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRACE_S = 60  # after SIGTERM, before SIGKILL

# Dense datasheet peaks (FLOP/s) by device kind substring, first match wins: NVIDIA's H200, H100
# (SXM and PCIe) and A100 datasheets (fp32 on CUDA cores; TF32 and bf16 on tensor cores, without
# sparsity), Google Cloud's TPU pages (bf16).
DATASHEET_PEAK_FLOPS = (
    ("H200", {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12}),
    ("H100 PCIe", {"fp32": 51e12, "tf32": 378e12, "bf16": 756e12}),
    ("H100", {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12}),
    ("A100", {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12}),
    ("TPU v4", {"bf16": 275e12}),
    ("TPU v5 lite", {"bf16": 197e12}),
    ("TPU v5p", {"bf16": 459e12}),
    ("TPU v6 lite", {"bf16": 918e12}),
)


@dataclasses.dataclass(frozen=True)
class Part:
    """A launcher run: `python -m launch.<launcher> --flagfile=<flagfile> <overrides>`; its figure
    is `scale` x the median logged `rate`. `needs` (a dataset name or a path under the repo) absent:
    `substitute` flags are added (a `--flagfile` among them replaces the paper config)."""

    name: str
    launcher: str
    flagfile: str
    overrides: tuple[str, ...]
    tiny: tuple[str, ...]
    rate: str
    figure: str
    scale: float = 1.0
    needs: str | None = None
    substitute: tuple[str, ...] = ()


PARTS = (
    Part("gan", "gan", "dcgan_fashion_mnist.flags",
         ("--num_steps=1000000", "--log_every=20", "--checkpoint_every=100",
          "--sample_every=1000000", "--eval_every=0"),
         ("--batch_size=8", "--num_steps=4", "--log_every=1", "--checkpoint_every=4"),
         "images_per_s", "gan_images_per_s", needs="fashion_mnist",
         substitute=("--dataset=digits",)),
    Part("learned_optimizer", "learned_optimizer", "lstm_mlp_mnist28.flags",
         ("--num_steps=1000000", "--log_every=10", "--validate_every=1000000",
          "--checkpoint_every=100", "--evaluate=false"),
         ("--num_steps=2", "--log_every=1", "--meta_batch_size=2", "--horizon=4",
          "--unroll_length=2", "--num_validation_tasks=2", "--checkpoint_every=2"),
         "steps_per_s", "lo_meta_steps_per_s", needs="../shared/data/mnist",
         substitute=("--flagfile=launch/configs/lstm_quadratic.flags",)),
    Part("maml", "maml", "maml_omniglot_5way1shot.flags",
         ("--num_steps=1000000", "--log_every=20", "--checkpoint_every=200",
          "--eval_every=1000000", "--evaluate=false"),
         ("--num_steps=4", "--log_every=1", "--checkpoint_every=4", "--meta_batch_size=2",
          "--eval_episodes_during_training=4"),
         "tasks_per_s", "maml_tasks_per_s", needs="../shared/data/omniglot/images_background.zip",
         substitute=("--flagfile=launch/configs/maml_sinusoid.flags",)),
    Part("nas_cnn", "nas", "nas_cnn_fashion_mnist.flags",
         ("--budget=100000", "--log_every=5", "--final_num_steps=1"),
         ("--budget=2", "--architectures_per_step=1", "--log_every=1", "--child_num_steps=2",
          "--child_batch_size=8", "--child_validation_size=64", "--final_num_steps=1"),
         "steps_per_s", "nas_children_per_hour", scale=3600.0, needs="fashion_mnist",
         substitute=("--child_dataset=digits", "--child_validation_size=300")),
    Part("nas_macro", "nas", "nas_macro_reinforce.flags",
         ("--budget=1000000", "--log_every=50"),
         ("--budget=20", "--log_every=5"),
         "steps_per_s", "nas_macro_evaluations_per_s", needs="../shared/data/nas"),
)
PART_NAMES = tuple(p.name for p in PARTS) + ("gan_step",)


def available(need: str | None) -> bool:
    """Whether a dataset (by name: its training split loads) or a path under the repo exists."""
    if need is None:
        return True
    if need in data.DATASETS:
        try:
            data.load(need, "train")
            return True
        except (data.DataNotFoundError, ImportError):
            return False
    return os.path.exists(os.path.join(REPO, need))


def part_command(part: Part, workdir: str, tiny: bool, minutes: float,
                 have_data: bool) -> list[str]:
    """The launcher's command line: the paper config, the substitute for missing data (a
    `--flagfile` there replaces the paper config's values), then the time box's overrides and the
    tiny ones, which win over both."""
    args = [sys.executable, "-m", f"launch.{part.launcher}",
            f"--flagfile={os.path.join('launch', 'configs', part.flagfile)}",
            f"--workdir={workdir}"]
    if not have_data:
        args.extend(part.substitute)
    args.extend(part.overrides)
    if part.launcher in ("gan", "maml"):  # stop at the first checkpoint past the time box
        args.append(f"--max_minutes={minutes}")
    if tiny:
        args.extend(part.tiny)
    return args


def median_rate(rows: list[dict], key: str) -> tuple[float | None, int]:
    """(median of `key` over the rows after the first that have it, or the first alone; number
    of rows used)."""
    rates = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    used = rates[1:] or rates
    return (statistics.median(used) if used else None), len(used)


def run_part(part: Part, root: str, tiny: bool, minutes: float) -> dict:
    """Runs `part` in a subprocess inside its time box; its record (command, exit status, seconds,
    how it stopped, the rates it logged and its figure)."""
    workdir = os.path.join(root, part.name)
    have_data = available(part.needs)
    command = part_command(part, workdir, tiny, minutes, have_data)
    if not have_data and not part.substitute:
        return skipped(part, command)
    log_path = os.path.join(root, f"{part.name}.log")
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=launcher_env(os.environ, part.launcher, tiny),
                                stdout=log, stderr=subprocess.STDOUT)
        stopped_by = "finished"
        try:
            proc.wait(timeout=60 * minutes + (120 if part.launcher in ("gan", "maml") else 0))
        except subprocess.TimeoutExpired:
            stopped_by = "time box (SIGTERM)"
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                stopped_by = "time box (SIGKILL)"
                proc.kill()
                proc.wait()
    seconds = time.monotonic() - start
    rows = metrics.read_metrics(workdir) if os.path.isdir(workdir) else []
    rate, intervals = median_rate(rows, part.rate)
    with open(log_path) as f:
        tail = f.read()[-3000:]
    return {"command": " ".join(command[1:]), "paper_config": part.flagfile,
            "substitute": None if have_data else " ".join(part.substitute),
            "returncode": proc.returncode, "stopped_by": stopped_by, "seconds": seconds,
            "steps_logged": rows[-1]["step"] if rows else 0, "rate_key": part.rate,
            "rate": rate, "intervals": intervals, part.figure: None if rate is None
            else rate * part.scale, "log_tail": None if proc.returncode in (0, 143) else tail}


def skipped(part: Part, command: list[str]) -> dict:
    """The record of a part whose data is missing and has no substitute."""
    return {"command": " ".join(command[1:]), "paper_config": part.flagfile, "substitute": None,
            "returncode": None, "stopped_by": f"skipped: {part.needs} not found",
            "seconds": 0.0, "steps_logged": 0, "rate_key": part.rate, "rate": None,
            "intervals": 0, part.figure: None, "log_tail": None}


def datasheet_peaks(device_kind: str) -> dict[str, float] | None:
    """The first `DATASHEET_PEAK_FLOPS` entry whose key is in `device_kind`."""
    return next((peaks for key, peaks in DATASHEET_PEAK_FLOPS if key in device_kind), None)


def gan_step_speed(tiny: bool, device_kind: str, platform: str) -> dict:
    """The tutorial's DCGAN train step (batch 256; 8 tiny): images/s after a warm-up (median of
    the repeats), FLOPs per step, achieved FLOP/s as a fraction of the measured matmul FLOP/s and of
    the datasheet peaks."""
    batch, steps, repeats = (8, 2, 2) if tiny else (256, 20, 5)
    batches = gan_speed.real_batches(batch, steps)
    step, compiled = gan_speed.our_step(batch)
    gan_speed.time_ours(step, batches[:2])
    seconds = [gan_speed.time_ours(step, batches) for _ in range(repeats)]
    images_per_s = batch * steps / statistics.median(seconds)
    flops = roofline.compiled_cost(compiled)["flops"]
    achieved = flops * images_per_s / batch
    n = 256 if tiny else (2048 if platform == "cpu" else 8192)
    matmul = roofline.matmul_peak_flops(n)
    peaks = datasheet_peaks(device_kind)
    return {"batch_size": batch, "steps": steps, "repeats": repeats,
            "images_per_s": images_per_s, "flops_per_step": flops, "achieved_flops": achieved,
            "matmul_n": n, "matmul_flops": matmul, "fraction_of_matmul": achieved / matmul,
            "datasheet_peak_flops": peaks,
            "fraction_of_datasheet_peak": {k: achieved / v for k, v in (peaks or {}).items()}}


def device_record() -> dict:
    """The devices JAX found."""
    devices = jax.devices()
    stats = {}
    try:
        stats = devices[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 -- not every backend reports memory
        pass
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
            "count": len(devices), "process_count": jax.process_count(),
            "memory_bytes": stats.get("bytes_limit"), "jax": jax.__version__}


def figures(parts: dict, step: dict | None) -> dict:
    """The headline figures: each part's figure, the GAN step's images/s and fractions."""
    out = {}
    for part in PARTS:
        if part.name in parts:
            out[part.figure] = parts[part.name][part.figure]
    if step:
        out["gan_step_images_per_s"] = step["images_per_s"]
        out["gan_step_fraction_of_matmul"] = step["fraction_of_matmul"]
        out["gan_step_fraction_of_datasheet_peak"] = step["fraction_of_datasheet_peak"]
    return out


def print_summary(result: dict) -> None:
    print(f"Machine: {machine.describe(result['machine'])}")
    dev = result["devices"]
    print(f"Devices: {dev['count']} x {dev['device_kind']} ({dev['platform']}), mode "
          f"{result['mode']}")
    for name, rec in result["parts"].items():
        print(f"  {name:18s} rc {rec['returncode']!s:>4s} {rec['seconds']:7.1f} s "
              f"{rec['stopped_by']:20s} {rec['rate_key']}={rec['rate']}"
              + (f"  (substitute: {rec['substitute']})" if rec["substitute"] else ""))
    for key, value in result["figures"].items():
        print(f"  {key}: {value}")


def launcher_env(environ, launcher: str, tiny: bool) -> dict:
    """The environment of a launcher: this one without the CPU settings (which this process
    applied to itself; the launchers that use them apply them again), on the CPU when tiny."""
    env = dict(environ, PYTHONPATH=REPO)
    if launcher not in cpu_settings.LAUNCHERS:
        for name, setting, separator in (("XLA_FLAGS", cpu_settings.XLA_FLAG, " "),
                                         ("GLIBC_TUNABLES", cpu_settings.GLIBC_TUNABLE, ":")):
            kept = [s for s in env.get(name, "").split(separator) if s and s != setting]
            if kept:
                env[name] = separator.join(kept)
            else:
                env.pop(name, None)
    if tiny:
        env["JAX_PLATFORMS"] = "cpu"
    return env


def main(argv):
    del argv
    tiny, minutes = FLAGS.tiny, (1.5 if FLAGS.tiny else FLAGS.minutes)
    selected = FLAGS.parts or list(PART_NAMES)
    unknown = set(selected) - set(PART_NAMES)
    if unknown:
        raise app.UsageError(f"Unknown parts {sorted(unknown)}; choose from {PART_NAMES}.")
    if tiny:
        jax.config.update("jax_platforms", "cpu")
    record = machine.machine_record()
    print(f"Machine: {machine.describe(record)}", flush=True)
    devices = device_record()
    result = {"benchmark": "accelerator_check", "mode": "tiny" if tiny else "full",
              "command": " ".join(["python -m benchmarks.accelerator_check", *sys.argv[1:]]),
              "time_box_minutes": minutes, "machine": record, "devices": devices,
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "parts": {}}
    with tempfile.TemporaryDirectory(prefix="accelerator_check_") as scratch:
        root = FLAGS.runs_dir or scratch
        os.makedirs(root, exist_ok=True)
        for part in PARTS:
            if part.name in selected:
                print(f"{part.name}: up to {minutes:g} min ...", flush=True)
                result["parts"][part.name] = run_part(part, root, tiny, minutes)
    step = None
    if "gan_step" in selected:
        step = gan_step_speed(tiny, devices["device_kind"], devices["platform"])
        result["gan_step"] = step
    result["figures"] = figures(result["parts"], step)
    result["load_after"] = list(os.getloadavg())
    print_summary(result)
    out = FLAGS.out or os.path.join(REPO, "benchmarks", "results",
                                    f"accelerator_{devices['platform']}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    metrics.write_json(out, result, non_finite="null")
    print("wrote", out)
    failed = [n for n, r in result["parts"].items() if r["returncode"] is not None
              and (r["returncode"] not in (0, 143) or r["rate"] is None)]
    if failed:
        raise SystemExit(f"Parts that failed or logged no rate: {failed} (see their log_tail).")


if __name__ == "__main__":
    app.run(main)
