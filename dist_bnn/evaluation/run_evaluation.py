"""``dist-bnn evaluate RUN_DIR``: test metrics of the Bayesian model average of a run's samples.

Runs as a plain process or under torchrun. The ranks split the posterior samples, not the
data: each rank reads its share of the sample files one at a time and predicts the whole
test split with each, and the ranks then combine their accumulators (log-sum-exp for
densities). Rank 0 writes, each file atomically:

    RUN_DIR/eval/metrics.json            classification: accuracy, nll, ece, brier;
                                         regression: rmse, test_ll (target's units);
                                         both: num_samples, by_num_samples
    RUN_DIR/eval/metrics_vs_samples.png  each metric against the number of samples averaged
    RUN_DIR/eval/reliability.png         classification: reliability diagram of the BMA
    RUN_DIR/eval/predictive.png          regression with one input: mean and a ±2σ band

``--split validation`` evaluates the validation split instead and writes the same files into
``RUN_DIR/eval_validation``; the keys keep their names (``test_ll`` is then the validation
log-likelihood).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ignite.distributed as idist
import torch

from dist_bnn import distributed
from dist_bnn.checkpoint import manager
from dist_bnn.checkpoint.files import write_json_atomic
from dist_bnn.config import Config, ConfigError, first_sample_epoch, from_dict
from dist_bnn.data import Splits, load_splits
from dist_bnn.errors import UsageError
from dist_bnn.evaluation.bma import stream_bma_by_num_samples
from dist_bnn.evaluation.metrics import (
    ECE_NUM_BINS,
    calibration_bins,
    classification_metrics,
    regression_metrics,
)
from dist_bnn.evaluation.plots import (
    CLASSIFICATION_CURVES,
    REGRESSION_CURVES,
    PredictiveBand,
    save_metrics_vs_samples,
    save_predictive_band,
    save_reliability_diagram,
)
from dist_bnn.likelihoods import MEAN, VARIANCE, Gaussian, Likelihood, build_likelihood
from dist_bnn.logs import setup_logging
from dist_bnn.models import build_model
from dist_bnn.training.run_dir import RUN_FILE
from dist_bnn.training.samples import SAMPLES_DIR

logger = logging.getLogger(__name__)

EVAL_DIR = "eval"
# Output directory of each split that ``dist-bnn evaluate --split`` accepts.
EVAL_DIRS = {"test": EVAL_DIR, "validation": "eval_validation"}
METRICS_FILE = "metrics.json"
RELIABILITY_FILE = "reliability.png"
CURVES_FILE = "metrics_vs_samples.png"
PREDICTIVE_FILE = "predictive.png"

METRIC_KEYS = {"classification": ("accuracy", "nll", "ece", "brier"), "regression": ("rmse", "test_ll")}

# Inputs at which the 1-D predictive band is drawn, spread over the data's range and a margin
# of this fraction of the range on each side, where the uncertainty should grow.
BAND_GRID_POINTS = 200
BAND_MARGIN_FRACTION = 0.25


def evaluate_run(run_dir: Path, log_level: str = "INFO", split: str = "test") -> None:
    """Evaluate the run in ``run_dir`` on every rank of this launch and write ``run_dir/eval``
    (``run_dir/eval_validation`` for ``split="validation"``).

    Raises:
        UsageError: if ``run_dir`` is missing, has no ``run.json`` or has no committed
            samples. Nothing is written then.
        ConfigError: if the run's data set can no longer be read (a UCI directory moved).
    """
    backend = distributed.resolve_backend("auto")
    # Ignite's launcher logs its own start and end at INFO; the command's own lines replace them.
    logging.getLogger("ignite.distributed.launcher.Parallel").setLevel(logging.WARNING)
    with idist.Parallel(backend=backend) as parallel:
        parallel.run(run_on_rank, run_dir, log_level, split)


def run_on_rank(local_rank: int, run_dir: Path, log_level: str, split: str = "test") -> None:
    """Evaluate on this rank. Every rank must call this (``idist.Parallel.run`` does)."""
    setup_logging(distributed.rank(), distributed.world_size(), log_level)

    # Rank 0 alone picks the checkpoint and every rank uses its choice: a training run that
    # commits a checkpoint meanwhile must not give the ranks different sample lists.
    inputs = EvaluationInputs.from_json(distributed.broadcast_json(
        locate_inputs(run_dir).to_json() if distributed.is_writer() else None
    ))
    if inputs.error is not None:
        raise UsageError(inputs.error)
    cfg = from_dict(inputs.config)

    result = evaluate_samples(cfg, [Path(p) for p in inputs.sample_paths], inputs.checkpoint, split)
    if distributed.is_writer():
        write_outputs(run_dir / EVAL_DIRS[split], result, inputs.checkpoint)
    # Leave together, so no rank tears down the process group while rank 0 still writes.
    distributed.barrier()


# ---------------------------------------------------------------------------------------------
# Inputs: the stored config and the committed sample files


@dataclass
class EvaluationInputs:
    """Config and sample files of the run to evaluate, read by rank 0 and broadcast as JSON."""

    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The resolved config from ``run.json``."""
    checkpoint: str = ""
    """Newest committed checkpoint directory, whose ``sample_files`` are evaluated."""
    sample_paths: list[str] = dataclasses.field(default_factory=list)
    """Paths of the committed sample files, oldest first."""
    error: str | None = None
    """Reason the run cannot be evaluated, set instead of the fields above."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "EvaluationInputs":
        return cls(**data)


def locate_inputs(run_dir: Path) -> EvaluationInputs:
    """Read ``run.json`` and the newest committed checkpoint's sample list. Only rank 0 calls
    this.

    Problems are returned in ``error`` rather than raised, so that rank 0 can broadcast them
    and every rank stops together.
    """
    try:
        return _locate_inputs(run_dir)
    except UsageError as err:
        return EvaluationInputs(error=str(err))


def _locate_inputs(run_dir: Path) -> EvaluationInputs:
    if not run_dir.is_dir():
        raise UsageError(
            f"run directory {run_dir} not found; pass the run.dir of a `dist-bnn train` run"
        )
    config = _read_config(run_dir)

    samples_dir = run_dir / SAMPLES_DIR
    newest, invalid = manager.select_checkpoint(run_dir, samples_dir)
    if invalid:
        # Evaluating an older checkpoint's samples instead would report other numbers silently.
        reasons = "; ".join(f"{path.name}: {reason}" for path, reason in invalid)
        raise UsageError(
            f"the newest checkpoint(s) of {run_dir} fail verification ({reasons}); restore the "
            f"damaged or missing files from a copy of the run directory, or relaunch "
            f"`dist-bnn train` on it, which falls back to the newest valid checkpoint"
        )
    if newest is None:
        raise UsageError(
            f"{run_dir} contains no committed checkpoint (no {manager.CHECKPOINTS_DIR}/*/manifest.json), "
            f"so it has no committed posterior samples; train until the first checkpoint after "
            f"samples.start_epoch is written, then evaluate again"
        )
    if not newest.manifest.sample_files:
        cfg = from_dict(config)
        rule = f"samples.start_epoch={cfg.samples.start_epoch}"
        if cfg.sampler.schedule == "cyclical":
            rule += " and the first epoch wholly in a sampling phase of the cyclical schedule"
        raise UsageError(
            f"the newest committed checkpoint {newest.path} (epoch {newest.manifest.epoch}) lists "
            f"no posterior samples: the first sample is the weights after epoch "
            f"{first_sample_epoch(cfg)} ({rule}); continue training past that epoch with "
            f"`dist-bnn train`, then evaluate again"
        )
    # verify_checkpoint checked every listed sample file's size and sha256.
    paths = [samples_dir / name for name in newest.manifest.sample_files]
    return EvaluationInputs(
        config=config, checkpoint=str(newest.path), sample_paths=[str(p) for p in paths]
    )


def _read_config(run_dir: Path) -> dict[str, Any]:
    """Return the validated config dict from ``run_dir/run.json``."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise UsageError(
            f"{path} not found, so {run_dir} is not a dist_bnn run directory (or its first "
            f"launch stopped before writing it); pass the run.dir of a `dist-bnn train` run"
        )
    try:
        config = json.loads(path.read_text())["config"]
        from_dict(config)
    except (OSError, ValueError, KeyError, TypeError) as err:
        # ConfigError is a ValueError, and so is json.JSONDecodeError.
        reason = f"invalid config: {err}" if isinstance(err, ConfigError) else f"{type(err).__name__}: {err}"
        raise UsageError(
            f"{path} is unreadable ({reason}); it must hold the \"config\" written by "
            f"`dist-bnn train` with this version of dist_bnn"
        ) from None
    return config


# ---------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvaluationResult:
    """Metrics of the BMA of all samples and of each prefix, the same on every rank."""

    task: str
    """``classification`` or ``regression``."""
    by_num_samples: list[dict[str, Any]]
    """One dict per k = 1..S: ``num_samples`` = k and the metrics of the first k samples."""
    final_predictive: torch.Tensor
    """Predictive of the BMA of all samples on the evaluated split: ``[examples, classes]`` log
    probabilities, or ``[examples, 3]`` log density, mean and variance in the target's units."""
    targets: torch.Tensor
    """``[examples]`` class indices of the evaluated split, or targets in the target's units."""
    split: str = "test"
    """The evaluated split, ``test`` or ``validation``."""
    band: PredictiveBand | None = None
    """Predictive mean and standard deviation over an input grid, for regression on one input."""

    @property
    def final(self) -> dict[str, Any]:
        return self.by_num_samples[-1]


def evaluate_samples(cfg: Config, sample_paths: list[Path], checkpoint: str, split: str = "test") -> EvaluationResult:
    """Compute the metrics of the BMA of the first k samples for every k on ``split`` (``test``
    or ``validation``). Every rank must call this.

    Raises:
        UsageError: for the validation split of a run trained with ``data.val_fraction=0``.
    """
    start = time.perf_counter()
    device = idist.device()
    splits = load_splits(cfg.data, cfg.training.seed)
    likelihood = build_likelihood(cfg, splits)
    features, targets = (splits.test if split == "test" else splits.val).tensors
    num_examples = len(targets)
    if num_examples == 0:
        raise UsageError(
            f"the {split} split of this run is empty (data.val_fraction={cfg.data.val_fraction} in "
            f"its run.json); evaluate it with --split test"
        )
    grid = _band_grid(splits) if isinstance(likelihood, Gaussian) and splits.num_features == 1 else None
    if grid is not None:
        # The grid rides along with the evaluated split through one streaming pass. Its targets
        # are placeholders: only the grid's mean and variance are used.
        features = torch.cat([features, grid])
        targets = torch.cat([targets, torch.zeros(len(grid), dtype=targets.dtype)])
    model = build_model(cfg, splits).to(device)
    logger.info(
        "evaluating the BMA of %d samples of %s on %d %s examples of %s with %d rank(s)",
        len(sample_paths), checkpoint, num_examples, split, cfg.data.name, distributed.world_size(),
    )

    eval_targets = _metric_targets(likelihood, targets[:num_examples]).to(device)
    by_num_samples: list[dict[str, Any]] = []
    final: list[torch.Tensor] = []

    def visit(num_samples: int, predictive: torch.Tensor) -> None:
        metrics = _metrics(likelihood, predictive[:num_examples], eval_targets)
        by_num_samples.append({"num_samples": num_samples, **metrics})
        logger.debug("first %d samples: %s", num_samples, _format(metrics))
        if num_samples == len(sample_paths):
            final.append(predictive.cpu())

    stream_bma_by_num_samples(
        model, sample_paths, features, targets, likelihood, cfg.data.eval_batch_size, visit
    )
    logger.info(
        "evaluated %d samples in %.2f s: %s",
        len(sample_paths), time.perf_counter() - start, _format(by_num_samples[-1]),
    )
    result = EvaluationResult(likelihood.task, by_num_samples, final[0][:num_examples], eval_targets.cpu(), split)
    if grid is not None:
        result.band = _band(splits, likelihood, grid, final[0][num_examples:], split)
    return result


def _metric_targets(likelihood: Likelihood, targets: torch.Tensor) -> torch.Tensor:
    """Return the targets that the metrics compare with: class indices or original units."""
    if isinstance(likelihood, Gaussian):
        return likelihood.to_original_units(targets)
    return targets


def _metrics(likelihood: Likelihood, predictive: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    if isinstance(likelihood, Gaussian):
        return regression_metrics(predictive, targets)
    return classification_metrics(predictive, targets)


def _band_grid(splits: Splits) -> torch.Tensor:
    """Return ``[BAND_GRID_POINTS, 1]`` standardised inputs covering every split and a margin."""
    inputs = torch.cat([split.tensors[0][:, 0] for split in (splits.train, splits.val, splits.test)])
    low, high = float(inputs.min()), float(inputs.max())
    margin = BAND_MARGIN_FRACTION * (high - low)
    return torch.linspace(low - margin, high + margin, BAND_GRID_POINTS).unsqueeze(1)


def _band(
    splits: Splits, likelihood: Gaussian, grid: torch.Tensor, predictive: torch.Tensor, split: str
) -> PredictiveBand:
    def original_inputs(inputs: torch.Tensor) -> list[float]:
        return (splits.feature_mean[0] + splits.feature_std[0] * inputs[:, 0].double()).tolist()

    def points(split) -> tuple[list[float], list[float]]:
        inputs, targets = split.tensors
        return original_inputs(inputs), likelihood.to_original_units(targets).tolist()

    return PredictiveBand(
        inputs=original_inputs(grid),
        mean=predictive[:, MEAN].tolist(),
        std=predictive[:, VARIANCE].sqrt().tolist(),
        train=points(splits.train),
        evaluated=points(splits.test if split == "test" else splits.val),
        evaluated_split=split,
    )


# ---------------------------------------------------------------------------------------------
# Outputs


def write_outputs(eval_dir: Path, result: EvaluationResult, checkpoint: str) -> None:
    """Write metrics.json and the figures into ``eval_dir``. Only rank 0 calls this."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    final = result.final
    metrics = {key: final[key] for key in (*METRIC_KEYS[result.task], "num_samples")}
    metrics["by_num_samples"] = result.by_num_samples
    _timed(eval_dir / METRICS_FILE, lambda path: write_json_atomic(path, metrics))

    title = f"BMA of {final['num_samples']} samples, {Path(checkpoint).name}"
    if result.task == "classification":
        bins = calibration_bins(result.final_predictive, result.targets, ECE_NUM_BINS)
        reliability_title = f"{title}\nECE ({ECE_NUM_BINS} bins) = {final['ece']:.4f}"
        _timed(
            eval_dir / RELIABILITY_FILE,
            lambda path: save_reliability_diagram(path, bins, reliability_title),
        )
    curves = CLASSIFICATION_CURVES if result.task == "classification" else REGRESSION_CURVES
    _timed(
        eval_dir / CURVES_FILE,
        lambda path: save_metrics_vs_samples(path, result.by_num_samples, title, curves),
    )
    band = result.band
    if band is not None:
        band_title = f"{title}\nRMSE = {final['rmse']:.4f}, {result.split} log-likelihood = {final['test_ll']:.4f}"
        _timed(eval_dir / PREDICTIVE_FILE, lambda path: save_predictive_band(path, band, band_title))


def _timed(path: Path, write: Callable[[Path], None]) -> None:
    start = time.perf_counter()
    write(path)
    logger.info("wrote %s in %.2f s", path, time.perf_counter() - start)


def _format(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
