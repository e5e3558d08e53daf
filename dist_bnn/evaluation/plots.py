"""PNG figures of an evaluation: a reliability diagram, metrics against the number of samples
and the predictive band of a regression on one input.

Figures are drawn with matplotlib's Agg canvas directly, without pyplot, so no global backend
is selected and no display is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dist_bnn.checkpoint.files import write_atomic
from dist_bnn.evaluation.metrics import CalibrationBins

_DPI = 120

# (key in the metric dicts, axis label), one panel each in metrics_vs_samples.png.
CLASSIFICATION_CURVES = (
    ("accuracy", "accuracy"),
    ("nll", "NLL (nats per example)"),
    ("ece", "ECE"),
    ("brier", "Brier score"),
)
REGRESSION_CURVES = (
    ("rmse", "RMSE (target units)"),
    ("test_ll", "test log-likelihood (nats per example)"),
)


@dataclass
class PredictiveBand:
    """Predictive of a regression on one input over a grid, with the data it was fitted to.

    Everything is in the data's original units: inputs, means, standard deviations and targets.
    """

    inputs: list[float]
    mean: list[float]
    std: list[float]
    """Standard deviation of the predictive mixture, noise included."""
    train: tuple[list[float], list[float]]
    """Training-split inputs and targets."""
    evaluated: tuple[list[float], list[float]]
    """Inputs and targets of the evaluated split."""
    evaluated_split: str = "test"
    """Name of the evaluated split, ``test`` or ``validation``."""


def save_reliability_diagram(path: Path, bins: CalibrationBins, title: str) -> None:
    """Write a reliability diagram (accuracy against confidence per bin) and a histogram of
    confidences to ``path``, atomically."""
    figure = Figure(figsize=(5.5, 6.5))
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])

    width = 1.0 / bins.num_bins
    lefts = [b * width for b in range(bins.num_bins)]
    counts = bins.counts.tolist()
    filled = [b for b in range(bins.num_bins) if counts[b] > 0]
    accuracy = [float(bins.correct_sums[b]) / counts[b] for b in filled]
    confidence = [float(bins.confidence_sums[b]) / counts[b] for b in filled]

    top.bar([lefts[b] for b in filled], accuracy, width=width, align="edge",
            edgecolor="black", color="tab:blue", label="accuracy")
    top.bar([lefts[b] for b in filled], confidence, width=width, align="edge",
            edgecolor="tab:red", fill=False, linewidth=1.5, label="mean confidence")
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(title)
    top.legend(loc="upper left", fontsize="small")

    total = max(sum(counts), 1)
    bottom.bar(lefts, [c / total for c in counts], width=width, align="edge",
               edgecolor="black", color="tab:gray")
    bottom.set_xlabel("confidence (largest predictive probability)")
    bottom.set_ylabel("fraction of examples")

    figure.tight_layout()
    _save(figure, path)


def save_metrics_vs_samples(
    path: Path, by_num_samples: list[dict[str, Any]], title: str, curves: Sequence[tuple[str, str]]
) -> None:
    """Write one panel per ``(metric key, axis label)`` of ``curves`` against the number of
    samples averaged to ``path``, atomically; two panels a row."""
    num_rows = (len(curves) + 1) // 2
    figure = Figure(figsize=(9, 3.25 * num_rows + 0.5))
    FigureCanvasAgg(figure)
    axes = figure.subplots(num_rows, 2, sharex=True, squeeze=False).flatten()
    num_samples = [row["num_samples"] for row in by_num_samples]
    marker = "o" if len(num_samples) <= 50 else None
    for ax, (key, label) in zip(axes, curves):
        ax.plot(num_samples, [row[key] for row in by_num_samples], marker=marker)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[-2:]:
        ax.set_xlabel("number of samples k (the first k by epoch)")
    figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)


def save_predictive_band(path: Path, band: PredictiveBand, title: str) -> None:
    """Write the predictive mean with a band of two standard deviations either side, over the
    training points and those of the evaluated split, to ``path``, atomically."""
    figure = Figure(figsize=(8, 5))
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    lower = [m - 2 * s for m, s in zip(band.mean, band.std)]
    upper = [m + 2 * s for m, s in zip(band.mean, band.std)]
    ax.fill_between(band.inputs, lower, upper, color="tab:blue", alpha=0.25, label="mean ± 2σ")
    ax.plot(band.inputs, band.mean, color="tab:blue", label="predictive mean")
    ax.scatter(*band.train, s=10, color="black", label="training split")
    ax.scatter(*band.evaluated, s=14, color="tab:red", marker="x", label=f"{band.evaluated_split} split")
    ax.set_xlabel("input")
    ax.set_ylabel("target")
    ax.set_title(title)
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    figure.tight_layout()
    _save(figure, path)


def _save(figure: Figure, path: Path) -> None:
    # The temporary name does not end in .png, so the format is named explicitly.
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=_DPI))
