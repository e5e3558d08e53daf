"""PNG figures of an evaluation: a reliability diagram and metrics against the number of samples.

Figures are drawn with matplotlib's Agg canvas directly, without pyplot, so no global backend
is selected and no display is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dist_bnn.checkpoint.files import write_atomic
from dist_bnn.evaluation.metrics import CalibrationBins

_DPI = 120

# (key in the metric dicts, axis label), one panel each in metrics_vs_samples.png.
_CURVES = (
    ("accuracy", "accuracy"),
    ("nll", "NLL (nats per example)"),
    ("ece", "ECE"),
    ("brier", "Brier score"),
)


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


def save_metrics_vs_samples(path: Path, by_num_samples: list[dict[str, Any]], title: str) -> None:
    """Write one panel per metric against the number of samples averaged to ``path``,
    atomically."""
    figure = Figure(figsize=(9, 6.5))
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2, sharex=True).flatten()
    num_samples = [row["num_samples"] for row in by_num_samples]
    marker = "o" if len(num_samples) <= 50 else None
    for ax, (key, label) in zip(axes, _CURVES):
        ax.plot(num_samples, [row[key] for row in by_num_samples], marker=marker)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[2:]:
        ax.set_xlabel("number of samples k (the first k by epoch)")
    figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)


def _save(figure: Figure, path: Path) -> None:
    # The temporary name does not end in .png, so the format is named explicitly.
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=_DPI))
