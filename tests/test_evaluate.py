"""`dist-bnn evaluate`: BMA metrics and plots of a finished run, alone and under torchrun."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DIGITS_CONFIG, SMALL_JOB, make_env, run, run_ok, train_command
from PIL import Image

from dist_bnn.cli import main
from dist_bnn.config import from_dict
from dist_bnn.data import load_splits
from dist_bnn.evaluation.metrics import brier_score, calibration_bins, classification_metrics
from dist_bnn.models import MLP

METRIC_KEYS = ("accuracy", "nll", "ece", "brier")

# Relative bound between the evaluate command and the training run's own BMA metrics. Both
# average the same float64 log-probabilities of the same float32 forward passes, and only
# the order of the final sums may differ.
FINAL_METRICS_REL_TOLERANCE = 1e-9

# Absolute bound between 1 and 2 ranks. Every rank predicts with the same batches, so each
# sample's log-probabilities are bitwise equal. Only the order of the float64 log-sum-exp
# over samples changes, and that moves a metric by a few units of float64 rounding.
RANKS_ABS_TOLERANCE = 1e-12

# Relative bound between the streamed log-space BMA and a direct average of softmax
# probabilities: the two orders of float64 operations differ by rounding only.
DIRECT_AVERAGE_REL_TOLERANCE = 1e-9

# Bound for the hand-made ECE and Brier examples, whose exact values are short decimals.
HAND_EXAMPLE_ABS_TOLERANCE = 1e-12

# Peak resident memory of an evaluation of 40 samples may exceed that of 4 by this fraction.
MEMORY_GROWTH_LIMIT = 0.10


def job(run_dir: Path, *extra: str) -> list[str]:
    # Samples at epochs 2, 3 and 4 and a checkpoint every epoch: 3 samples do not split
    # evenly over 2 ranks, and the checkpoint of epoch 1 commits no sample.
    return [
        str(DIGITS_CONFIG), f"run.dir={run_dir}", *SMALL_JOB, "training.num_epochs=4",
        "samples.start_epoch=2", "samples.every_epochs=1", "checkpoint.every_epochs=1",
        "wandb.mode=disabled", *extra,
    ]


def evaluate_command(run_dir: Path, nproc: int | None = None) -> list[str]:
    cli = ["-m", "dist_bnn", "evaluate", str(run_dir)]
    if nproc is None:
        return [sys.executable, *cli]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(nproc), *cli,
    ]


def newest_manifest(run_dir: Path) -> dict:
    paths = sorted((run_dir / "checkpoints").glob("epoch*/manifest.json"))
    return json.loads(paths[-1].read_text())


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("eval"))
    return target


def tree(root: Path) -> dict[str, int]:
    """Return every path under ``root`` with its modification time."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evaluate")
    env = make_env(root)
    run_dir = root / "run"
    run_ok(train_command(job(run_dir)), env)
    result = run_ok(evaluate_command(run_dir), env)
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    return {"dir": run_dir, "env": env, "metrics": metrics, "stderr": result.stderr}


# ---------------------------------------------------------------------------------------------
# A finished run evaluated by a plain process


def test_metrics_file_keys(finished):
    metrics = finished["metrics"]
    assert set(metrics) == {*METRIC_KEYS, "num_samples", "by_num_samples"}
    assert metrics["num_samples"] == 3
    assert [row["num_samples"] for row in metrics["by_num_samples"]] == [1, 2, 3]
    for row in metrics["by_num_samples"]:
        assert set(row) == {*METRIC_KEYS, "num_samples"}


def test_metrics_in_range(finished):
    for row in [finished["metrics"], *finished["metrics"]["by_num_samples"]]:
        assert 0.0 <= row["accuracy"] <= 1.0, row
        assert 0.0 < row["nll"] < math.inf, row
        assert 0.0 <= row["ece"] <= 1.0, row
        assert 0.0 <= row["brier"] <= 2.0, row


def test_last_prefix_is_final(finished):
    metrics = finished["metrics"]
    last = metrics["by_num_samples"][-1]
    for key in METRIC_KEYS:
        assert metrics[key] == last[key], key


def test_plots_are_png(finished):
    for name in ("reliability.png", "metrics_vs_samples.png"):
        path = finished["dir"] / "eval" / name
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), name
        with Image.open(path) as image:
            assert image.format == "PNG", name
            image.verify()


def test_no_temporary_files_left(finished):
    names = sorted(p.name for p in (finished["dir"] / "eval").iterdir())
    assert names == ["metrics.json", "metrics_vs_samples.png", "reliability.png"]


def test_logs_paths_and_seconds(finished):
    eval_dir = finished["dir"] / "eval"
    for name in ("metrics.json", "reliability.png", "metrics_vs_samples.png"):
        assert f"wrote {eval_dir / name} in " in finished["stderr"], name
    assert "evaluated 3 samples in " in finished["stderr"]


def test_matches_training_final_metrics(finished):
    final = newest_manifest(finished["dir"])["final_metrics"]
    metrics = finished["metrics"]
    assert metrics["num_samples"] == final["test/num_samples"]
    assert math.isclose(metrics["accuracy"], final["test/accuracy"], rel_tol=FINAL_METRICS_REL_TOLERANCE)
    assert math.isclose(metrics["nll"], final["test/nll"], rel_tol=FINAL_METRICS_REL_TOLERANCE)


def test_prefixes_match_direct_average(finished):
    run_dir = finished["dir"]
    cfg = from_dict(json.loads((run_dir / "run.json").read_text())["config"])
    splits = load_splits(cfg.data, cfg.training.seed)
    features, targets = splits.test.tensors
    model = MLP(splits.num_features, cfg.model.hidden_sizes, splits.num_classes, cfg.model.activation)
    names = newest_manifest(run_dir)["sample_files"]
    assert names == ["sample_0002.pt", "sample_0003.pt", "sample_0004.pt"]

    probs_sum = torch.zeros(len(targets), splits.num_classes, dtype=torch.float64)
    for k, name in enumerate(names, start=1):
        model.load_state_dict(torch.load(run_dir / "samples" / name, weights_only=True))
        with torch.no_grad():
            probs_sum += torch.softmax(model(features).double(), dim=1)
        probs = probs_sum / k
        row = finished["metrics"]["by_num_samples"][k - 1]
        accuracy = (probs.argmax(dim=1) == targets).double().mean().item()
        nll = -probs.gather(1, targets.unsqueeze(1)).log().mean().item()
        brier = ((probs - torch.nn.functional.one_hot(targets, splits.num_classes)) ** 2).sum(1).mean().item()
        assert row["accuracy"] == accuracy, k
        assert math.isclose(row["nll"], nll, rel_tol=DIRECT_AVERAGE_REL_TOLERANCE), k
        assert math.isclose(row["brier"], brier, rel_tol=DIRECT_AVERAGE_REL_TOLERANCE), k


def test_validation_split_matches_direct_average(finished, tmp_path, restore_logging):
    run_dir = copy_run(finished["dir"], tmp_path / "run")
    assert main(["evaluate", str(run_dir), "--split", "validation"]) == 0
    assert not (run_dir / "eval").exists()
    metrics = json.loads((run_dir / "eval_validation" / "metrics.json").read_text())

    cfg = from_dict(json.loads((run_dir / "run.json").read_text())["config"])
    splits = load_splits(cfg.data, cfg.training.seed)
    features, targets = splits.val.tensors
    model = MLP(splits.num_features, cfg.model.hidden_sizes, splits.num_classes, cfg.model.activation)
    probs_sum = torch.zeros(len(targets), splits.num_classes, dtype=torch.float64)
    for name in newest_manifest(run_dir)["sample_files"]:
        model.load_state_dict(torch.load(run_dir / "samples" / name, weights_only=True))
        with torch.no_grad():
            probs_sum += torch.softmax(model(features).double(), dim=1)
    probs = probs_sum / metrics["num_samples"]
    nll = -probs.gather(1, targets.unsqueeze(1)).log().mean().item()
    assert metrics["num_samples"] == 3
    assert math.isclose(metrics["nll"], nll, rel_tol=DIRECT_AVERAGE_REL_TOLERANCE)
    # Different examples: the test split's NLL is another number.
    assert metrics["nll"] != finished["metrics"]["nll"]


def test_empty_validation_split_exits_2(tmp_path, capsys, restore_logging):
    run_dir = tmp_path / "run"
    run_ok(train_command(job(run_dir, "data.val_fraction=0", "training.validate_every_epochs=0")), make_env(tmp_path))
    assert main(["evaluate", str(run_dir), "--split", "validation"]) == 2
    assert "the validation split of this run is empty (data.val_fraction=0.0" in capsys.readouterr().err
    assert not (run_dir / "eval_validation").exists()


def test_two_ranks_match_one_process(finished, tmp_path):
    run_dir = copy_run(finished["dir"], tmp_path / "run")
    result = run_ok(evaluate_command(run_dir, nproc=2), finished["env"])
    assert "with 2 rank(s)" in result.stderr
    two_ranks = json.loads((run_dir / "eval" / "metrics.json").read_text())
    one_process = finished["metrics"]
    assert two_ranks["num_samples"] == one_process["num_samples"]
    for left, right in zip(two_ranks["by_num_samples"], one_process["by_num_samples"], strict=True):
        assert left["num_samples"] == right["num_samples"]
        for key in METRIC_KEYS:
            assert math.isclose(left[key], right[key], rel_tol=0, abs_tol=RANKS_ABS_TOLERANCE), (key, left)
    for key in METRIC_KEYS:
        assert math.isclose(two_ranks[key], one_process[key], rel_tol=0, abs_tol=RANKS_ABS_TOLERANCE), key


# ---------------------------------------------------------------------------------------------
# Metrics on hand-made predictions


# Four examples, three classes: predictive probabilities and targets. The confidences 0.9,
# 0.5, 0.5 and 0.45 lie inside the 15-bin intervals (13/15, 14/15], (7/15, 8/15] (twice) and
# (6/15, 7/15], away from any bin edge.
HAND_PROBS = [[0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.25, 0.3, 0.45]]
HAND_TARGETS = [0, 2, 1, 0]


def direct_ece(probs: list[list[float]], targets: list[int], num_bins: int) -> float:
    """ECE with explicit loops: bins (b/M, (b+1)/M], gap weighted by the bin's share."""
    members: dict[int, list[tuple[float, bool]]] = {}
    for row, target in zip(probs, targets):
        confidence = max(row)
        predicted = row.index(confidence)
        b = min(max(math.ceil(confidence * num_bins) - 1, 0), num_bins - 1)
        members.setdefault(b, []).append((confidence, predicted == target))
    total = 0.0
    for rows in members.values():
        mean_confidence = sum(c for c, _ in rows) / len(rows)
        accuracy = sum(1.0 for _, ok in rows if ok) / len(rows)
        total += len(rows) / len(probs) * abs(accuracy - mean_confidence)
    return total


def direct_brier(probs: list[list[float]], targets: list[int]) -> float:
    total = 0.0
    for row, target in zip(probs, targets):
        total += sum((p - (1.0 if c == target else 0.0)) ** 2 for c, p in enumerate(row))
    return total / len(probs)


def hand_log_probs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(HAND_PROBS, dtype=torch.float64).log(), torch.tensor(HAND_TARGETS)


def test_ece_hand_example():
    log_probs, targets = hand_log_probs()
    expected = direct_ece(HAND_PROBS, HAND_TARGETS, num_bins=15)
    # Bins: {0.9: right}, {0.5: wrong, 0.5: right}, {0.45: wrong}.
    assert math.isclose(expected, (0.1 + 0.0 + 0.45) / 4, abs_tol=HAND_EXAMPLE_ABS_TOLERANCE)
    actual = classification_metrics(log_probs, targets)["ece"]
    assert math.isclose(actual, expected, abs_tol=HAND_EXAMPLE_ABS_TOLERANCE)


def test_calibration_bins_hand_example():
    log_probs, targets = hand_log_probs()
    bins = calibration_bins(log_probs, targets, num_bins=15)
    assert bins.counts.tolist() == [0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 1, 0]
    assert bins.correct_sums.tolist() == [0] * 7 + [1.0] + [0] * 5 + [1.0, 0]


def test_ece_confidence_one_in_last_bin():
    log_probs = torch.tensor([[0.0, -math.inf]], dtype=torch.float64)
    bins = calibration_bins(log_probs, torch.tensor([1]), num_bins=15)
    assert bins.counts.tolist() == [0] * 14 + [1]
    assert bins.expected_calibration_error() == 1.0


def test_brier_hand_example():
    log_probs, targets = hand_log_probs()
    expected = direct_brier(HAND_PROBS, HAND_TARGETS)
    # Per example: 0.01 + 0.0025 + 0.0025, 0.25 + 0.09 + 0.64, 0.04 + 0.25 + 0.09,
    # 0.5625 + 0.09 + 0.2025.
    assert math.isclose(expected, (0.015 + 0.98 + 0.38 + 0.855) / 4, abs_tol=HAND_EXAMPLE_ABS_TOLERANCE)
    assert math.isclose(brier_score(log_probs, targets), expected, abs_tol=HAND_EXAMPLE_ABS_TOLERANCE)
    from_all_metrics = classification_metrics(log_probs, targets)["brier"]
    assert math.isclose(from_all_metrics, expected, abs_tol=HAND_EXAMPLE_ABS_TOLERANCE)


def test_accuracy_and_nll_hand_example():
    log_probs, targets = hand_log_probs()
    metrics = classification_metrics(log_probs, targets)
    assert metrics["accuracy"] == 0.5
    expected_nll = -(math.log(0.9) + math.log(0.2) + math.log(0.5) + math.log(0.25)) / 4
    assert math.isclose(metrics["nll"], expected_nll, abs_tol=HAND_EXAMPLE_ABS_TOLERANCE)


# ---------------------------------------------------------------------------------------------
# Run directories that cannot be evaluated: exit code 2, nothing written


def test_missing_run_dir_exits_2(tmp_path, env):
    before = tree(tmp_path)
    result = run(evaluate_command(tmp_path / "absent"), env)
    assert result.returncode == 2
    assert f"run directory {tmp_path / 'absent'} not found" in result.stderr
    assert tree(tmp_path) == before


def without_run_file(run_dir: Path) -> None:
    (run_dir / "run.json").unlink()


def without_checkpoints(run_dir: Path) -> None:
    shutil.rmtree(run_dir / "checkpoints")


def only_first_checkpoint(run_dir: Path) -> None:
    for path in sorted((run_dir / "checkpoints").iterdir())[1:]:
        shutil.rmtree(path)


def without_one_sample(run_dir: Path) -> None:
    (run_dir / "samples" / "sample_0003.pt").unlink()


@pytest.fixture
def restore_logging():
    """Undo the logging set-up that an in-process ``main`` call applies, after the test."""
    names = ("dist_bnn", "ignite", "ignite.distributed.launcher.Parallel")
    saved = {name: (logging.getLogger(name), logging.getLogger(name).level) for name in names}
    package = logging.getLogger("dist_bnn")
    handlers, propagate = list(package.handlers), package.propagate
    yield
    for logger, level in saved.values():
        logger.setLevel(level)
    package.handlers[:] = handlers
    package.propagate = propagate


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (without_run_file, "run.json not found"),
        (without_checkpoints, "contains no committed checkpoint"),
        (only_first_checkpoint, "lists no posterior samples: the first sample is the weights after epoch 2 (samples.start_epoch=2)"),
        (without_one_sample, "is missing"),
    ],
    ids=["no-run-json", "no-checkpoint", "no-samples", "missing-sample"],
)
def test_unusable_run_dir_exits_2(damage, message, finished, tmp_path, capsys, restore_logging):
    run_dir = copy_run(finished["dir"], tmp_path / "run")
    damage(run_dir)
    before = tree(tmp_path)
    assert main(["evaluate", str(run_dir)]) == 2
    assert message in capsys.readouterr().err
    assert tree(tmp_path) == before
    assert not (run_dir / "eval").exists()


def test_no_samples_yet_names_cyclical_sampling_phase(tmp_path, capsys, restore_logging):
    # Cycles of 4 epochs explore for their first 2, so epoch 3 is the first sample.
    run_dir = tmp_path / "run"
    run_ok(
        train_command(job(
            run_dir, "samples.start_epoch=1", "sampler.schedule=cyclical", "sampler.cycle_epochs=4",
            "sampler.exploration_fraction=0.5",
        )),
        make_env(tmp_path),
    )
    for path in sorted((run_dir / "checkpoints").iterdir())[2:]:
        shutil.rmtree(path)
    assert main(["evaluate", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "(epoch 2) lists no posterior samples: the first sample is the weights after epoch 3" in err
    assert "sampling phase of the cyclical schedule" in err


# ---------------------------------------------------------------------------------------------
# Memory does not grow with the number of samples


def peak_rss_of_evaluation(run_dir: Path, env: dict[str, str]) -> int:
    """Run the evaluate command in a fresh process and return its peak resident set in KiB."""
    code = (
        "import resource, sys\n"
        "from dist_bnn.cli import main\n"
        "assert main(['evaluate', sys.argv[1]]) == 0\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(run_dir)], env=env, capture_output=True, text=True, check=True
    )
    return int(result.stdout.split()[-1])


@pytest.mark.slow
def test_memory_flat_in_num_samples(tmp_path, env):
    # 1.1 M parameters (4.4 MB) per sample, so holding 40 samples at once would add about
    # 170 MB to a peak of a few hundred MB and break the limit.
    wide = ("model.hidden_sizes=[1024,1024]", "checkpoint.every_epochs=100", "samples.start_epoch=1")
    peaks = {}
    for num_samples in (4, 40):
        run_dir = tmp_path / f"run{num_samples}"
        run_ok(train_command(job(run_dir, *wide, f"training.num_epochs={num_samples}")), env)
        assert len(newest_manifest(run_dir)["sample_files"]) == num_samples
        peaks[num_samples] = peak_rss_of_evaluation(run_dir, env)
    print(f"peak RSS in KiB: {peaks}")
    assert peaks[40] <= peaks[4] * (1 + MEMORY_GROWTH_LIMIT), peaks
