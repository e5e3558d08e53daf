"""Regression runs end to end: training with a Gaussian likelihood, then `dist-bnn evaluate`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_env, run_ok, train_command
from PIL import Image
from test_evaluate import copy_run, evaluate_command, newest_manifest
from torch.distributions import Normal

from dist_bnn.config import from_dict
from dist_bnn.data import load_splits
from dist_bnn.models import build_model
from dist_bnn.testing import compare_runs, load_dcp

METRIC_KEYS = ("rmse", "test_ll")

# Relative bound between the evaluate command and a direct computation of the mixture from
# the sample files, or the training run's own BMA metrics: the same float32 forward passes
# and float64 sums in another order.
DIRECT_REL_TOLERANCE = 1e-9

# Absolute bound between 1 and 2 ranks: each sample's statistics are bitwise equal, only the
# order of the float64 log-sum-exp and sums over samples changes.
RANKS_ABS_TOLERANCE = 1e-12


def job(run_dir: Path, *extra: str) -> list[str]:
    # 130 training examples of the 1-D set in batches of 32: 4 steps an epoch. Samples at
    # epochs 2, 3 and 4, so 3 samples do not split evenly over 2 ranks.
    return [
        f"run.dir={run_dir}", "data.name=toy1d", "data.batch_size=32", "model.hidden_sizes=[16]",
        "sampler.lr=0.01", "training.num_epochs=4", "samples.start_epoch=2", "samples.every_epochs=1",
        "checkpoint.every_epochs=1", "wandb.mode=disabled", *extra,
    ]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("regression")
    env = make_env(root)
    run_dir = root / "run"
    run_ok(train_command(job(run_dir)), env)
    result = run_ok(evaluate_command(run_dir), env)
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    return {"dir": run_dir, "env": env, "metrics": metrics, "stderr": result.stderr, "root": root}


def test_metrics_file_keys(finished):
    metrics = finished["metrics"]
    assert set(metrics) == {*METRIC_KEYS, "num_samples", "by_num_samples"}
    assert metrics["num_samples"] == 3
    assert [row["num_samples"] for row in metrics["by_num_samples"]] == [1, 2, 3]
    for row in metrics["by_num_samples"]:
        assert set(row) == {*METRIC_KEYS, "num_samples"}
        assert 0 < row["rmse"] < math.inf
        assert math.isfinite(row["test_ll"])


def test_eval_files_are_png(finished):
    eval_dir = finished["dir"] / "eval"
    assert sorted(p.name for p in eval_dir.iterdir()) == ["metrics.json", "metrics_vs_samples.png", "predictive.png"]
    for name in ("metrics_vs_samples.png", "predictive.png"):
        with Image.open(eval_dir / name) as image:
            assert image.format == "PNG", name
            image.verify()
        assert f"wrote {eval_dir / name} in " in finished["stderr"], name


def test_prefixes_match_direct_mixture(finished):
    run_dir = finished["dir"]
    cfg = from_dict(json.loads((run_dir / "run.json").read_text())["config"])
    splits = load_splits(cfg.data, cfg.training.seed)
    features, targets = splits.test.tensors
    y = splits.target_mean + splits.target_std * targets.double()
    model = build_model(cfg, splits)
    log_densities, means = [], []
    for k, name in enumerate(newest_manifest(run_dir)["sample_files"], start=1):
        model.load_state_dict(torch.load(run_dir / "samples" / name, weights_only=True))
        with torch.no_grad():
            outputs = model(features).double()
        mean = splits.target_mean + splits.target_std * outputs[:, 0]
        std = splits.target_std * outputs[:, 1].exp()
        log_densities.append(Normal(mean, std).log_prob(y))
        means.append(mean)
        test_ll = (torch.logsumexp(torch.stack(log_densities), dim=0) - math.log(k)).mean().item()
        rmse = ((torch.stack(means).mean(dim=0) - y) ** 2).mean().sqrt().item()
        row = finished["metrics"]["by_num_samples"][k - 1]
        assert math.isclose(row["test_ll"], test_ll, rel_tol=DIRECT_REL_TOLERANCE), k
        assert math.isclose(row["rmse"], rmse, rel_tol=DIRECT_REL_TOLERANCE), k


def test_matches_training_final_metrics(finished):
    final = newest_manifest(finished["dir"])["final_metrics"]
    metrics = finished["metrics"]
    assert final["test/num_samples"] == metrics["num_samples"]
    assert math.isclose(final["test/rmse"], metrics["rmse"], rel_tol=DIRECT_REL_TOLERANCE)
    assert math.isclose(-final["test/nll"], metrics["test_ll"], rel_tol=DIRECT_REL_TOLERANCE)


def test_validation_rows_have_regression_metrics(finished):
    rows = [json.loads(line) for line in (finished["dir"] / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        assert {"val/rmse", "val/nll", "train/loss"} <= set(row)
        assert "val/accuracy" not in row


def test_noise_scale_sampled_and_saved(finished):
    run_dir = finished["dir"]
    latents = [
        torch.load(path, weights_only=True)["log_noise_std.latent"]
        for path in sorted((run_dir / "samples").glob("sample_*.pt"))
    ]
    assert len(latents) == 3
    # The sampler moves the noise scale: it is a sampled parameter, not a constant.
    assert not torch.equal(latents[0], latents[1])
    final_checkpoint = sorted((run_dir / "checkpoints").glob("epoch*"))[-1]
    saved = load_dcp(final_checkpoint)
    assert torch.equal(saved["model"]["log_noise_std.latent"], latents[-1])


def test_two_ranks_match_one_process(finished, tmp_path):
    run_dir = copy_run(finished["dir"], tmp_path / "run")
    result = run_ok(evaluate_command(run_dir, nproc=2), finished["env"])
    assert "with 2 rank(s)" in result.stderr
    two_ranks = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert two_ranks["num_samples"] == finished["metrics"]["num_samples"]
    for left, right in zip(two_ranks["by_num_samples"], finished["metrics"]["by_num_samples"], strict=True):
        assert left["num_samples"] == right["num_samples"]
        for key in METRIC_KEYS:
            assert math.isclose(left[key], right[key], rel_tol=0, abs_tol=RANKS_ABS_TOLERANCE), (key, left)
    assert (run_dir / "eval" / "predictive.png").is_file()


def test_longer_run_continues_chain_bitwise(finished, tmp_path):
    # Two epochs, then the same command with training.num_epochs=4: the inferred noise scale
    # and its momentum resume with the weights, so the result is the uninterrupted run's.
    run_dir = tmp_path / "run"
    first = [arg for arg in job(run_dir) if not arg.startswith("training.num_epochs")]
    run_ok(train_command([*first, "training.num_epochs=2"]), finished["env"])
    run_ok(train_command(job(run_dir)), finished["env"])
    assert compare_runs(finished["dir"], run_dir) is None


def test_fixed_noise_run_keeps_best_by_rmse(finished, tmp_path):
    run_dir = tmp_path / "run"
    extra = (
        "likelihood.noise=fixed", "likelihood.noise_std=0.1", "checkpoint.keep_last=1",
        "checkpoint.keep_best=1", "checkpoint.best_metric=val/rmse",
    )
    run_ok(train_command(job(run_dir, *extra)), finished["env"])
    run_ok(evaluate_command(run_dir), finished["env"])
    sample = torch.load(run_dir / "samples" / "sample_0002.pt", weights_only=True)
    assert not any("log_noise_std" in name for name in sample)
    retained = [json.loads((p / "manifest.json").read_text()) for p in sorted((run_dir / "checkpoints").glob("epoch*"))]
    rmse_by_epoch = {
        row["epoch"]: row["val/rmse"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    }
    best_epoch = min(rmse_by_epoch, key=rmse_by_epoch.get)
    assert {manifest["epoch"] for manifest in retained} == {best_epoch, 4}
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert set(metrics) == {*METRIC_KEYS, "num_samples", "by_num_samples"}


def test_two_rank_training(finished, tmp_path):
    # The inferred noise scale passes through forward, so DDP all-reduces its gradient and the
    # replica check at every checkpoint finds both ranks holding the same value.
    run_dir = tmp_path / "run"
    run_ok(train_command(job(run_dir), nproc=2), finished["env"])
    final = newest_manifest(run_dir)["final_metrics"]
    assert final["test/num_samples"] == 3
    assert math.isfinite(final["test/nll"])
    sample = torch.load(run_dir / "samples" / "sample_0004.pt", weights_only=True)
    assert sample["log_noise_std.latent"].item() != 0.0
