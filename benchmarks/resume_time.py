"""Launch-to-first-step of a resumed run against a fresh run plus the DCP load, same run.

Each repetition launches ``dist-bnn train`` under torchrun (2 gloo ranks) twice: once on a new
run directory, once on a copy of a run directory whose newest checkpoint ends at epoch 2. It
measures the seconds from the launch to the log line ``first step of this launch done``. The resumed launch's ``loaded checkpoint ... in X s`` line
gives the DCP load time. The model is an MLP of 4.3 M parameters, so a checkpoint contains about
35 MB of model and sampler state.

    python benchmarks/resume_time.py        # 5 repetitions, about 2 min

Target: resumed launch-to-first-step <= 1.2 x (fresh launch-to-first-step + DCP load time).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DIGITS_CONFIG, machine, median  # noqa: E402

from dist_bnn.testing import job_environment, kill_tree  # noqa: E402

JOB = ["model.hidden_sizes=[2048,2048]", "checkpoint.every_epochs=2", "samples.start_epoch=2", "wandb.mode=disabled"]
FIRST_STEP = "first step of this launch done"
LOADED = re.compile(r"loaded checkpoint \S+ in (\d+\.\d+) s")
TIMEOUT_S = 300


def command(run_dir: Path, nproc: int, epochs: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "-m", "dist_bnn", "train", str(DIGITS_CONFIG), *JOB, f"training.num_epochs={epochs}", f"run.dir={run_dir}",
    ]


def launch_to_first_step(run_dir: Path, nproc: int, env: dict[str, str]) -> tuple[float, float | None]:
    """Launch, wait for the first step, stop the launch; return the seconds and the load time."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command(run_dir, nproc, 4), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    load = None
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if match := LOADED.search(line):
                load = float(match.group(1))
            if FIRST_STEP in line:
                return time.perf_counter() - start, load
            if time.perf_counter() - start > TIMEOUT_S:
                break
        raise RuntimeError(f"no {FIRST_STEP!r} line from {' '.join(command(run_dir, nproc, 4))}")
    finally:
        kill_tree(process.pid)
        process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument("--nproc", type=int, default=2, help="gloo ranks (default 2)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="dist-bnn-resume-time-") as scratch:
        root = Path(scratch)
        env = job_environment(root)
        source = root / "source"
        result = subprocess.run(command(source, args.nproc, 2), env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"preparing the checkpoint failed:\n{result.stderr[-4000:]}")
        fresh, resumed, loads = [], [], []
        for repeat in range(args.repeats):
            fresh.append(launch_to_first_step(root / f"fresh{repeat}", args.nproc, env)[0])
            copy = root / f"resumed{repeat}"
            shutil.copytree(source, copy)
            seconds, load = launch_to_first_step(copy, args.nproc, env)
            if load is None:
                raise RuntimeError(f"the launch on {copy} did not resume")
            resumed.append(seconds)
            loads.append(load)

    base = median(fresh) + median(loads)
    print(f"machine: {machine()}")
    print(f"{args.nproc} gloo ranks, medians of {args.repeats} launches each")
    print(f"fresh launch to first step:   {median(fresh):.2f} s")
    print(f"DCP load of the checkpoint:   {median(loads):.3f} s")
    print(f"resumed launch to first step: {median(resumed):.2f} s -> ratio to fresh + load {median(resumed) / base:.3f}  (target <= 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
