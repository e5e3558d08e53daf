"""The multi-node path on one machine: two torchrun agents joined by a c10d rendezvous on
127.0.0.1, one process each, started through launch/torchrun_multinode.sh.

Both agents are killed after a committed checkpoint and relaunched; the finished run must equal,
bitwise, an uninterrupted single-node run with two processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import DIGITS_CONFIG, LAUNCH_TIMEOUT_S, REPO, SMALL_JOB, committed, newest_checkpoint, run_ok, train_command

from dist_bnn.testing import compare_runs, kill_tree

LAUNCHER = REPO / "launch" / "torchrun_multinode.sh"
NUM_NODES = 2
KILL_AFTER_EPOCH = 2


def job(run_dir: Path) -> list[str]:
    return [
        str(DIGITS_CONFIG), f"run.dir={run_dir}", *SMALL_JOB, "training.num_epochs=4",
        "samples.start_epoch=2", "samples.every_epochs=1", "checkpoint.every_epochs=1",
    ]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that the OS reported free. It is released before torchrun
    binds it, so another program could take it in between."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_nodes(args: list[str], env: dict[str, str], log_prefix: Path) -> list[subprocess.Popen]:
    """Start one launcher per simulated node, each in its own session, sharing a new rendezvous."""
    node_env = {
        **env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "NNODES": str(NUM_NODES),
        "NPROC_PER_NODE": "1",
        "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
        "RDZV_ID": "dist-bnn-test",
        # Without it the agents announce the host name, which may not resolve to loopback.
        "LOCAL_ADDR": "127.0.0.1",
    }
    nodes = []
    for node in range(NUM_NODES):
        with open(f"{log_prefix}-node{node}.log", "wb") as log:
            nodes.append(subprocess.Popen(
                ["bash", str(LAUNCHER), *args], env=node_env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            ))
    return nodes


def stop(nodes: list[subprocess.Popen]) -> None:
    """SIGKILL every process that these launches started."""
    for process in nodes:
        kill_tree(process.pid)
        process.wait()


def logs(log_prefix: Path) -> str:
    return "".join(
        Path(f"{log_prefix}-node{node}.log").read_text(errors="replace") for node in range(NUM_NODES)
    )


def wait_for_commit(nodes: list[subprocess.Popen], run_dir: Path, epoch: int, log_prefix: Path) -> None:
    """Poll until the checkpoint of ``epoch`` is committed; fail if a node exits first."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not committed(run_dir, epoch):
        exited = [process.returncode for process in nodes if process.poll() is not None]
        if exited:
            raise AssertionError(f"a node exited ({exited}) before epoch {epoch} was committed:\n{logs(log_prefix)[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no checkpoint of epoch {epoch} within {LAUNCH_TIMEOUT_S} s")
        time.sleep(0.01)


def wait_for_exit(nodes: list[subprocess.Popen]) -> list[int]:
    """Return the exit codes of all nodes, raising ``TimeoutExpired`` if one hangs."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    return [process.wait(timeout=max(deadline - time.monotonic(), 0)) for process in nodes]


def test_two_nodes_resume_exactly(tmp_path, env):
    reference, run_dir = tmp_path / "single-node", tmp_path / "two-nodes"
    run_ok(train_command(job(reference), nproc=2), env)

    first = tmp_path / "first"
    nodes = start_nodes(job(run_dir), env, first)
    try:
        wait_for_commit(nodes, run_dir, KILL_AFTER_EPOCH, first)
    finally:
        stop(nodes)

    second = tmp_path / "second"
    nodes = start_nodes(job(run_dir), env, second)
    try:
        exit_codes = wait_for_exit(nodes)
    finally:
        stop(nodes)
    output = logs(second)
    assert exit_codes == [0, 0], output[-4000:]

    assert "resumed from" in output
    manifest = json.loads((newest_checkpoint(run_dir) / "manifest.json").read_text())
    assert manifest["world_size"] == NUM_NODES
    assert sorted(path.name for path in (newest_checkpoint(run_dir) / "rng").iterdir()) == [
        "rank_00000.pt", "rank_00001.pt",
    ]
    assert compare_runs(reference, run_dir) is None
