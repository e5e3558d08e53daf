"""``dist-bnn evaluate RUN_DIR``: test metrics of the Bayesian model average of a run's samples.

Runs as a plain process or under torchrun. The ranks split the posterior samples, not the
data: each rank reads its share of the sample files one at a time and predicts the whole
test split with each, and the ranks then combine their log-sum-exp accumulators. Rank 0
writes, each file atomically:

    RUN_DIR/eval/metrics.json            accuracy, nll, ece, brier, num_samples, by_num_samples
    RUN_DIR/eval/reliability.png         reliability diagram of the BMA of all samples
    RUN_DIR/eval/metrics_vs_samples.png  each metric against the number of samples averaged
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
from dist_bnn.config import Config, ConfigError, from_dict
from dist_bnn.data import load_splits
from dist_bnn.errors import UsageError
from dist_bnn.evaluation.bma import stream_bma_by_num_samples
from dist_bnn.evaluation.metrics import ECE_NUM_BINS, calibration_bins, classification_metrics
from dist_bnn.evaluation.plots import save_metrics_vs_samples, save_reliability_diagram
from dist_bnn.logs import setup_logging
from dist_bnn.models import MLP
from dist_bnn.training.run_dir import RUN_FILE
from dist_bnn.training.samples import SAMPLES_DIR

logger = logging.getLogger(__name__)

EVAL_DIR = "eval"
METRICS_FILE = "metrics.json"
RELIABILITY_FILE = "reliability.png"
CURVES_FILE = "metrics_vs_samples.png"

CLASSIFICATION_DATASETS = ("digits", "breast_cancer")


def evaluate_run(run_dir: Path, log_level: str = "INFO") -> None:
    """Evaluate the run in ``run_dir`` on every rank of this launch and write ``run_dir/eval``.

    Raises:
        UsageError: if ``run_dir`` is missing, has no ``run.json`` or has no committed
            samples. Nothing is written then.
        NotImplementedError: for a data set that is not a classification task.
    """
    backend = distributed.resolve_backend("auto")
    # Ignite's launcher logs its own start and end at INFO; the command's own lines replace them.
    logging.getLogger("ignite.distributed.launcher.Parallel").setLevel(logging.WARNING)
    with idist.Parallel(backend=backend) as parallel:
        parallel.run(run_on_rank, run_dir, log_level)


def run_on_rank(local_rank: int, run_dir: Path, log_level: str) -> None:
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
    check_supported(cfg)

    result = evaluate_samples(cfg, [Path(p) for p in inputs.sample_paths], inputs.checkpoint)
    if distributed.is_writer():
        write_outputs(run_dir / EVAL_DIR, result, inputs.checkpoint)
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
        raise UsageError(
            f"the newest committed checkpoint {newest.path} (epoch {newest.manifest.epoch}) lists "
            f"no posterior samples because sampling starts at samples.start_epoch="
            f"{config['samples']['start_epoch']}; continue training past that epoch with "
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


def check_supported(cfg: Config) -> None:
    """Raise NotImplementedError unless ``cfg`` is a classification task."""
    # TODO(regression): regression data sets need Gaussian predictive metrics (RMSE, test
    # log-likelihood) instead of accuracy, ECE and Brier score.
    if cfg.data.name not in CLASSIFICATION_DATASETS:
        raise NotImplementedError(
            f"dist-bnn evaluate supports classification only (data.name in "
            f"{', '.join(CLASSIFICATION_DATASETS)}); got data.name={cfg.data.name!r}"
        )


# ---------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvaluationResult:
    """Metrics of the BMA of all samples and of each prefix, the same on every rank."""

    by_num_samples: list[dict[str, Any]]
    """One dict per k = 1..S: ``num_samples`` = k and the metrics of the first k samples."""
    final_log_probs: torch.Tensor
    """``[examples, classes]`` log predictive probabilities of the BMA of all samples."""
    targets: torch.Tensor
    """``[examples]`` test-split class indices."""

    @property
    def final(self) -> dict[str, Any]:
        return self.by_num_samples[-1]


def evaluate_samples(cfg: Config, sample_paths: list[Path], checkpoint: str) -> EvaluationResult:
    """Compute the metrics of the BMA of the first k samples for every k on the test split.
    Every rank must call this."""
    start = time.perf_counter()
    device = idist.device()
    splits = load_splits(cfg.data, cfg.training.seed)
    features, targets = splits.test.tensors
    model = MLP(splits.num_features, cfg.model.hidden_sizes, splits.num_classes, cfg.model.activation)
    model.to(device)
    logger.info(
        "evaluating the BMA of %d samples of %s on %d test examples of %s with %d rank(s)",
        len(sample_paths), checkpoint, len(targets), cfg.data.name, distributed.world_size(),
    )

    targets_on_device = targets.to(device)
    by_num_samples: list[dict[str, Any]] = []
    final: list[torch.Tensor] = []

    def visit(num_samples: int, log_probs: torch.Tensor) -> None:
        metrics = classification_metrics(log_probs, targets_on_device)
        by_num_samples.append({"num_samples": num_samples, **metrics})
        logger.debug("first %d samples: %s", num_samples, _format(metrics))
        if num_samples == len(sample_paths):
            final.append(log_probs.cpu())

    stream_bma_by_num_samples(
        model, sample_paths, features, splits.num_classes, cfg.data.eval_batch_size, visit
    )
    logger.info(
        "evaluated %d samples in %.2f s: %s",
        len(sample_paths), time.perf_counter() - start, _format(by_num_samples[-1]),
    )
    return EvaluationResult(by_num_samples, final[0], targets)


# ---------------------------------------------------------------------------------------------
# Outputs


def write_outputs(eval_dir: Path, result: EvaluationResult, checkpoint: str) -> None:
    """Write metrics.json and the two figures into ``eval_dir``. Only rank 0 calls this."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    final = result.final
    metrics = {key: final[key] for key in ("accuracy", "nll", "ece", "brier", "num_samples")}
    metrics["by_num_samples"] = result.by_num_samples
    _timed(eval_dir / METRICS_FILE, lambda path: write_json_atomic(path, metrics))

    bins = calibration_bins(result.final_log_probs, result.targets, ECE_NUM_BINS)
    title = f"BMA of {final['num_samples']} samples, {Path(checkpoint).name}"
    reliability_title = f"{title}\nECE ({ECE_NUM_BINS} bins) = {final['ece']:.4f}"
    _timed(
        eval_dir / RELIABILITY_FILE,
        lambda path: save_reliability_diagram(path, bins, reliability_title),
    )
    _timed(
        eval_dir / CURVES_FILE,
        lambda path: save_metrics_vs_samples(path, result.by_num_samples, title),
    )


def _timed(path: Path, write: Callable[[Path], None]) -> None:
    start = time.perf_counter()
    write(path)
    logger.info("wrote %s in %.2f s", path, time.perf_counter() - start)


def _format(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
