"""Kill a small 2-rank job at random moments, relaunch it, and compare with an uninterrupted run.

Each trial launches the job and SIGKILLs every process of it (launcher and ranks), either after
a random delay or while a checkpoint save is paused at a chosen phase (``DIST_BNN_PAUSE_AT``).
It relaunches the same command for 1 to ``--max-kills`` kills and lets the last launch finish. The finished run must equal the uninterrupted one: sample files bitwise, final model and
optimizer bitwise, each epoch exactly once in ``metrics.jsonl`` and in the W&B offline history.

    python benchmarks/fault_injection.py --trials 30         # prints "30/30 equal"
    python benchmarks/fault_injection.py --trials 2 --seed 7 # the CI-sized run
    python benchmarks/fault_injection.py --trials 30 --async-save

Exit code 0 when every trial is equal, 1 otherwise (the first difference is printed).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dist_bnn.faults import PAUSE_AT_ENV, PAUSE_MARKER_ENV, PHASES
from dist_bnn.testing import compare_runs, job_environment, kill_tree

REPO = Path(__file__).resolve().parents[1]
JOB = [
    str(REPO / "configs" / "digits_sghmc.yaml"),
    "model.hidden_sizes=[32]",
    "training.num_epochs=8",
    "samples.start_epoch=3",
    "samples.every_epochs=1",
    "checkpoint.every_epochs=2",
    "checkpoint.keep_last=2",
]
# Upper bound for one launch; a launch that takes longer has hung.
LAUNCH_TIMEOUT_S = 300


def command(run_dir: Path, nproc: int, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "-m", "dist_bnn", "train", *JOB, *extra, f"run.dir={run_dir}",
    ]


def run_to_end(run_dir: Path, nproc: int, env: dict[str, str], log: Path, extra: list[str]) -> None:
    with open(log, "ab") as output:
        result = subprocess.run(command(run_dir, nproc, extra), env=env, stdout=output, stderr=output, timeout=LAUNCH_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"launch on {run_dir} failed with exit code {result.returncode}; see {log}")


def run_and_kill(run_dir: Path, nproc: int, env: dict[str, str], log: Path, fault: dict, extra: list[str]) -> str:
    """Launch, kill at the fault, and describe what happened."""
    env = dict(env)
    marker = run_dir.parent / f"{run_dir.name}.paused"
    marker.unlink(missing_ok=True)
    if fault["kind"] == "pause":
        env[PAUSE_AT_ENV] = f"{fault['phase']}:{fault['occurrence']}"
        env[PAUSE_MARKER_ENV] = str(marker)
    with open(log, "ab") as output:
        process = subprocess.Popen(command(run_dir, nproc, extra), env=env, stdout=output, stderr=output, start_new_session=True)
        start = time.monotonic()
        try:
            while process.poll() is None:
                elapsed = time.monotonic() - start
                if fault["kind"] == "delay" and elapsed >= fault["seconds"]:
                    return f"killed after {elapsed:.1f} s"
                if fault["kind"] == "pause" and marker.exists():
                    return f"killed while paused at phase {fault['phase']!r} (save {fault['occurrence']})"
                if elapsed > LAUNCH_TIMEOUT_S:
                    raise RuntimeError(f"launch on {run_dir} hung; see {log}")
                time.sleep(0.01)
            if process.returncode != 0:
                raise RuntimeError(f"launch on {run_dir} failed with exit code {process.returncode}; see {log}")
            return "finished before the fault"
        finally:
            kill_tree(process.pid)
            process.wait()


def random_fault(rng: random.Random, reference_seconds: float) -> dict:
    if rng.random() < 0.5:
        return {"kind": "delay", "seconds": rng.uniform(0.5, reference_seconds)}
    # Four checkpoints in the job (epochs 2, 4, 6, 8); a resumed launch saves fewer.
    return {"kind": "pause", "phase": rng.choice(PHASES), "occurrence": rng.randint(1, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5, help="number of killed-and-relaunched runs (default 5)")
    parser.add_argument("--max-kills", type=int, default=2, help="kills per trial, at most (default 2)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per launch (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault schedule (default 0)")
    parser.add_argument("--workdir", type=Path, default=None, help="where runs go (default: a temporary directory)")
    parser.add_argument(
        "--async-save", action="store_true",
        help="killed runs write their periodic checkpoints with checkpoint.async_save=true; the "
        "reference run stays synchronous, so the comparison also checks that both modes agree",
    )
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory(prefix="dist-bnn-faults-") as scratch:
        root = args.workdir or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        env = job_environment(root)
        env.pop(PAUSE_AT_ENV, None)
        reference = root / "reference"
        start = time.monotonic()
        run_to_end(reference, args.nproc, env, root / "reference.log", [])
        reference_seconds = time.monotonic() - start
        print(f"reference run: {reference_seconds:.1f} s", flush=True)

        equal = 0
        for trial in range(1, args.trials + 1):
            run_dir = root / f"trial{trial:03d}"
            log = root / f"trial{trial:03d}.log"
            extra = ["checkpoint.async_save=true"] if args.async_save else []
            events = [
                run_and_kill(run_dir, args.nproc, env, log, random_fault(rng, reference_seconds), extra)
                for _ in range(rng.randint(1, args.max_kills))
            ]
            run_to_end(run_dir, args.nproc, env, log, extra)
            difference = compare_runs(reference, run_dir)
            print(f"trial {trial}: {'; '.join(events)} -> {'equal' if difference is None else difference}", flush=True)
            if difference is None:
                equal += 1
            elif args.workdir is None:
                print(f"first difference in trial {trial}: {difference}")
                break
        print(f"{equal}/{args.trials} equal")
    return 0 if equal == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
