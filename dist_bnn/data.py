"""Data sets (scikit-learn, the UCI split format, a synthetic 1-D set), splits and loaders."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from ignite.engine import Engine, Events
from sklearn import datasets as sk_datasets
from torch.utils.data import DataLoader, DistributedSampler, Sampler, TensorDataset

from dist_bnn.config import ConfigError, DataConfig, task_of
from dist_bnn.errors import UsageError

logger = logging.getLogger(__name__)

_SKLEARN_LOADERS = {
    "digits": sk_datasets.load_digits,
    "breast_cancer": sk_datasets.load_breast_cancer,
    "wine": sk_datasets.load_wine,
    "diabetes": sk_datasets.load_diabetes,
}

# The synthetic 1-D set is the same for every training.seed: only its split depends on the seed.
TOY1D_SEED = 20261204
TOY1D_NUM_EXAMPLES = 200
TOY1D_NOISE_STD = 0.1
"""Standard deviation of the Gaussian noise added to the toy targets, in target units."""

UCI_FILES = ("data.txt", "index_features.txt", "index_target.txt")


@dataclass
class Splits:
    """Train, validation and test splits of one data set, with standardised inputs.

    Inputs are standardised with the training split's statistics, and ``feature_mean`` and
    ``feature_std`` map them back to the original units. Classification targets are int64
    class indices. Regression targets are float32 and standardised the same way, and
    ``target_mean`` and ``target_std`` map them back (``y = target_mean + target_std * y_standardised``).
    """

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_features: int
    num_classes: int | None
    """Number of classes, or ``None`` for a regression data set."""
    target_mean: float = 0.0
    target_std: float = 1.0
    feature_mean: tuple[float, ...] = ()
    """Per-input mean of the training split, one entry per feature."""
    feature_std: tuple[float, ...] = ()
    """Per-input standard deviation of the training split (1 for a constant input)."""

    @property
    def task(self) -> str:
        return "classification" if self.num_classes is not None else "regression"


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Load ``cfg.name`` and split it into train/validation/test deterministically from ``seed``.

    Inputs (and regression targets) are standardised with the mean and standard deviation of
    the training split, which excludes the validation examples. A column that is constant
    there is only centred. ``data.name=uci`` takes its test set from the split files and carves the
    validation set out of the split's training examples.

    Raises:
        ConfigError: for a UCI directory, file or split that does not exist or cannot be read.
    """
    _warn_unused_keys(cfg)
    rng = np.random.default_rng(seed)  # private: the split must not touch the global RNG
    if cfg.name == "uci":
        features, targets, train_idx, test_idx = _read_uci(Path(str(cfg.root)), cfg.split)
        order = rng.permutation(train_idx)
        num_val = int(round(cfg.val_fraction * len(order)))
        val_idx, train_idx = order[:num_val], order[num_val:]
    else:
        features, targets = _load_arrays(cfg.name)
        order = rng.permutation(len(targets))
        num_test = int(round(cfg.test_fraction * len(targets)))
        num_val = int(round(cfg.val_fraction * len(targets)))
        test_idx = order[:num_test]
        val_idx = order[num_test : num_test + num_val]
        train_idx = order[num_test + num_val :]

    feature_mean, feature_std = _mean_and_std(features[train_idx])
    standardised = ((features - feature_mean) / feature_std).astype(np.float32)
    regression = task_of(cfg.name) == "regression"
    if regression:
        target_mean, target_std = _mean_and_std(targets[train_idx])
        targets = ((targets - target_mean) / target_std).astype(np.float32)
    else:
        targets = targets.astype(np.int64)

    def subset(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(standardised[idx]), torch.from_numpy(targets[idx]))

    return Splits(
        train=subset(train_idx),
        val=subset(val_idx),
        test=subset(test_idx),
        num_features=features.shape[1],
        num_classes=None if regression else int(targets.max()) + 1,
        target_mean=float(target_mean) if regression else 0.0,
        target_std=float(target_std) if regression else 1.0,
        feature_mean=tuple(float(v) for v in feature_mean),
        feature_std=tuple(float(v) for v in feature_std),
    )


def _warn_unused_keys(cfg: DataConfig) -> None:
    if cfg.name == "uci":
        if cfg.test_fraction != DataConfig.test_fraction:
            logger.warning("data.test_fraction=%g is ignored by data.name=uci, whose split files "
                           "fix the test set", cfg.test_fraction)
    elif cfg.root is not None or cfg.split != DataConfig.split:
        logger.warning("data.root and data.split are used by data.name=uci only; data.name=%s "
                       "ignores them", cfg.name)


def _mean_and_std(values: np.ndarray) -> tuple[Any, Any]:
    """Return the mean and standard deviation over axis 0, with a zero deviation replaced by
    1 so that a constant column is only centred."""
    mean, std = values.mean(axis=0), values.std(axis=0)
    if np.ndim(std) == 0:
        return mean, std if std > 0 else 1.0
    std[std == 0] = 1.0
    return mean, std


def _load_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(features [examples, inputs], targets [examples])`` in float64."""
    if name == "toy1d":
        return toy1d_arrays()
    bunch = _SKLEARN_LOADERS[name]()
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.float64)


def toy1d_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Return the synthetic 1-D regression set: ``y = sin(3x) + x/2 + noise``.

    The inputs fill [-2, -0.5] and [0.5, 2] uniformly, half each, so that the gap between them
    shows whether the predictive uncertainty grows away from the data.
    """
    rng = np.random.default_rng(TOY1D_SEED)
    half = TOY1D_NUM_EXAMPLES // 2
    x = np.concatenate([rng.uniform(-2.0, -0.5, half), rng.uniform(0.5, 2.0, TOY1D_NUM_EXAMPLES - half)])
    y = np.sin(3.0 * x) + 0.5 * x + rng.normal(0.0, TOY1D_NOISE_STD, TOY1D_NUM_EXAMPLES)
    return x[:, None], y


def _read_uci(root: Path, split: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read a UCI-format directory: ``(features, targets, train rows, test rows)`` of ``split``."""
    if not root.is_dir():
        raise ConfigError(
            f"data.root={root} is not a directory; set data.root to a directory that contains "
            f"{', '.join(UCI_FILES)} and index_train_K.txt / index_test_K.txt"
        )
    num_splits = len(list(root.glob("index_train_*.txt")))
    for kind in ("train", "test"):
        if not (root / f"index_{kind}_{split}.txt").is_file():
            raise ConfigError(
                f"data.split={split} is out of range: {root} has no index_{kind}_{split}.txt "
                f"(it has {num_splits} training split file(s), index_train_K.txt); use a split K "
                f"whose index_train_K.txt and index_test_K.txt exist"
            )
    table = _read_table(root / "data.txt", np.float64, ndmin=2)
    feature_columns = _read_indices(root / "index_features.txt", table.shape[1])
    target_column = _read_indices(root / "index_target.txt", table.shape[1])
    if len(target_column) != 1:
        raise ConfigError(f"{root / 'index_target.txt'} must contain one column index, got {target_column.tolist()}")
    train_idx = _read_indices(root / f"index_train_{split}.txt", len(table))
    test_idx = _read_indices(root / f"index_test_{split}.txt", len(table))
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise ConfigError(f"split {split} of {root} has an empty training or test index file")
    return table[:, feature_columns], table[:, target_column[0]], train_idx, test_idx


def _read_table(path: Path, dtype: type, ndmin: int) -> np.ndarray:
    if not path.is_file():
        raise ConfigError(
            f"{path} not found; data.root={path.parent} must contain {', '.join(UCI_FILES)} and "
            f"the index_train_K.txt / index_test_K.txt files of the UCI split format"
        )
    try:
        return np.loadtxt(path, dtype=dtype, ndmin=ndmin)
    except ValueError as err:
        raise ConfigError(f"{path} is not a whitespace-separated table of numbers: {err}") from None


def _read_indices(path: Path, bound: int) -> np.ndarray:
    """Read 0-based indices from ``path`` and check that each is below ``bound``."""
    indices = _read_table(path, np.int64, ndmin=1)
    if indices.size and (indices.min() < 0 or indices.max() >= bound):
        raise ConfigError(
            f"{path} contains index {int(indices.max()) if indices.max() >= bound else int(indices.min())}, "
            f"outside [0, {bound}); the index files must be 0-based and match data.txt"
        )
    return indices


def per_rank_batch_size(global_batch_size: int, world_size: int) -> int:
    """Return the per-rank batch size, rejecting a global size that does not divide evenly."""
    if global_batch_size % world_size != 0:
        raise UsageError(
            f"data.batch_size={global_batch_size} is the global batch and must divide by the "
            f"world size {world_size}; choose a multiple of {world_size}, e.g. "
            f"data.batch_size={max(world_size, global_batch_size // world_size * world_size)}"
        )
    return global_batch_size // world_size


def build_train_loader(
    dataset: TensorDataset,
    global_batch_size: int,
    world_size: int,
    rank: int,
    shuffle: bool,
    seed: int,
) -> DataLoader:
    """Build this rank's training loader: a disjoint shard of a seeded per-epoch permutation.

    ``drop_last`` on both the sampler and the loader gives every rank the same number of steps,
    so no rank waits in DDP's all-reduce for a batch the others do not have. Call
    :func:`attach_sampler_epoch` so each epoch draws a new order.
    """
    batch_size = per_rank_batch_size(global_batch_size, world_size)
    sampler = ResumableDistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
    )
    # The order comes from the sampler's seed and epoch. The loader gets a generator of its own
    # because each iteration of a DataLoader draws a seed from its generator: from the global
    # one, a resume inside an epoch (one extra iteration) would shift the checkpointed RNG state.
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=True, generator=torch.Generator()
    )
    if len(loader) == 0:
        raise UsageError(
            f"data.batch_size={global_batch_size} is larger than the training split "
            f"({len(dataset)} examples over {world_size} rank(s)), so an epoch has no step; "
            f"lower data.batch_size"
        )
    return loader


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can skip the examples already consumed in a resumed epoch.

    A resume inside an epoch must continue with the next batch of that epoch's order, not
    replay its first batches: Ignite restores the iteration counter but iterates a fresh loader.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._skip = 0

    def skip_next(self, num_examples: int) -> None:
        """Drop the first ``num_examples`` of this rank's indices in the next iteration only."""
        self._skip = num_examples

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])


def attach_sampler_epoch(engine: Engine, loader: DataLoader) -> None:
    """Call ``set_epoch`` with the true 0-based epoch at every epoch start.

    Ignite does not do this itself; without it every epoch repeats the first order. The epoch
    comes from ``engine.state``, which a resume restores, so the first epoch after a resume
    draws the same order as in a run that never stopped.
    """
    sampler = loader.sampler
    if not isinstance(sampler, DistributedSampler):
        raise TypeError(f"expected a DistributedSampler, got {type(sampler).__name__}")

    @engine.on(Events.EPOCH_STARTED)
    def _set_epoch(engine: Engine) -> None:
        sampler.set_epoch(engine.state.epoch - 1)


class ShardSampler(Sampler[int]):
    """Rank ``rank``'s strided share of ``range(length)``, without padding.

    ``DistributedSampler`` pads the shards to equal size by repeating examples, which would
    count some examples twice in a metric summed over ranks. This sampler does not pad, so the
    shards are disjoint and cover every example exactly once.
    """

    def __init__(self, length: int, world_size: int, rank: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_eval_loader(dataset: TensorDataset, batch_size: int, world_size: int, rank: int) -> DataLoader:
    """Build this rank's loader over a disjoint, unpadded shard of ``dataset`` in fixed order."""
    sampler = ShardSampler(len(dataset), world_size, rank)
    # A generator of its own: iterating a DataLoader draws a seed from its generator, and the
    # global one belongs to the checkpointed RNG state, which evaluation must leave untouched.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=torch.Generator())
