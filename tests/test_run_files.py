"""What a run leaves on disk: files that load without executing code, and guarded run dirs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import DIGITS_CONFIG, SMALL_JOB, run, run_ok, train_command

from dist_bnn.errors import SampleConflictError
from dist_bnn.models import MLP
from dist_bnn.training.samples import SampleStore


def job(run_dir: Path, *extra: str) -> list[str]:
    return [
        str(DIGITS_CONFIG), f"run.dir={run_dir}", *SMALL_JOB, "training.num_epochs=3",
        "samples.start_epoch=2", "samples.every_epochs=1", "checkpoint.every_epochs=2", *extra,
    ]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    from conftest import make_env

    root = tmp_path_factory.mktemp("files")
    env = make_env(root)
    run_dir = root / "run"
    result = run_ok(train_command(job(run_dir)), env)
    return {"dir": run_dir, "env": env, "stderr": result.stderr}


def test_prints_bma_test_metrics(finished):
    assert "test metrics of the Bayesian model average: test/accuracy=" in finished["stderr"]


def test_samples_load_weights_only(finished):
    paths = sorted((finished["dir"] / "samples").glob("*.pt"))
    assert [p.name for p in paths] == ["sample_0002.pt", "sample_0003.pt"]
    for path in paths:
        state = torch.load(path, weights_only=True)
        assert all(isinstance(value, torch.Tensor) for value in state.values())
        assert not any(key.startswith("module.") for key in state)
        MLP(64, [32], 10).load_state_dict(state)


def test_rng_files_load_weights_only(finished):
    for path in (finished["dir"] / "checkpoints").glob("*/rng/rank_*.pt"):
        state = torch.load(path, weights_only=True)
        assert set(state) >= {"torch", "numpy", "python"}


def test_manifest_and_run_file_are_json(finished):
    manifests = sorted((finished["dir"] / "checkpoints").glob("*/manifest.json"))
    assert [p.parent.name.split("-")[0] for p in manifests] == ["epoch0002", "epoch0003"]
    last = json.loads(manifests[-1].read_text())
    for key in ("epoch", "iteration", "epoch_length", "world_size", "sample_files", "wandb_run_id", "versions", "config_hash"):
        assert key in last, key
    assert last["sample_files"] == ["sample_0002.pt", "sample_0003.pt"]
    assert set(last["versions"]) == {"torch", "pytorch-ignite", "dist_bnn"}
    identity = json.loads((finished["dir"] / "run.json").read_text())
    assert identity["wandb_run_id"] == last["wandb_run_id"]


def test_changed_trajectory_rejected(finished):
    before = sorted(p for p in finished["dir"].rglob("*"))
    result = run(train_command(job(finished["dir"], "sampler.lr=0.1", "training.num_epochs=5")), finished["env"])
    assert result.returncode == 2
    assert "sampler.lr: 0.005 -> 0.1" in result.stderr
    assert sorted(p for p in finished["dir"].rglob("*")) == before


def test_run_file_of_an_older_version_resumes(finished):
    # A run.json written before sampler.schedule and the pSGLD keys existed: the missing keys
    # count as their defaults, which keep the behaviour of that older version.
    from dist_bnn.config import load_config
    from dist_bnn.training.run_dir import plan_run

    identity = json.loads((finished["dir"] / "run.json").read_text())
    older = {k: v for k, v in identity["trajectory"].items() if not k.startswith(("sampler.schedule", "sampler.psgld"))}
    assert len(older) < len(identity["trajectory"])
    (finished["dir"] / "run.json").write_text(json.dumps({**identity, "trajectory": older}))
    try:
        cfg = load_config(job(finished["dir"])[0], job(finished["dir"])[1:])
        assert plan_run(finished["dir"], cfg, 1).error is None
        changed = load_config(job(finished["dir"])[0], [*job(finished["dir"])[1:], "sampler.schedule=cyclical", "sampler.cycle_epochs=3"])
        assert "sampler.schedule: 'constant' -> 'cyclical'" in plan_run(finished["dir"], changed, 1).error
    finally:
        (finished["dir"] / "run.json").write_text(json.dumps(identity))


def test_resume_disabled_rejected(finished):
    result = run(train_command(job(finished["dir"], "run.resume=false")), finished["env"])
    assert result.returncode == 2
    assert "set run.resume=true" in result.stderr


def test_foreign_directory_rejected(tmp_path, env):
    (tmp_path / "run" / "samples").mkdir(parents=True)
    result = run(train_command(job(tmp_path / "run")), env)
    assert result.returncode == 2
    assert "not created by dist_bnn" in result.stderr
    assert not (tmp_path / "run" / "run.json").exists()


def test_partial_checkpoint_removed(tmp_path, env):
    run_dir = tmp_path / "run"
    run_ok(train_command(job(run_dir, "training.num_epochs=2")), env)
    partial = run_dir / "checkpoints" / ".partial-epoch0003-iter000000054"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half")
    result = run_ok(train_command(job(run_dir)), env)
    assert f"removing checkpoint directory {partial} left by an interrupted save" in result.stderr
    assert not partial.exists()


def test_sample_conflict_detected(tmp_path):
    store = SampleStore(tmp_path)
    torch.manual_seed(0)
    model = MLP(3, [4], 2)
    store.write(1, model)
    again = SampleStore(tmp_path)
    again.write(1, model)  # identical tensors: kept
    with torch.no_grad():
        model[0].bias += 1
    other = SampleStore(tmp_path)
    with pytest.raises(SampleConflictError, match="already exists with different tensors"):
        other.write(1, model)
