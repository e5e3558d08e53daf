"""Data sets shipped with scikit-learn, seeded splits and the distributed loaders."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from ignite.engine import Engine, Events
from sklearn import datasets as sk_datasets
from torch.utils.data import DataLoader, DistributedSampler, Sampler, TensorDataset

from dist_bnn.config import DataConfig
from dist_bnn.errors import UsageError

logger = logging.getLogger(__name__)

_LOADERS = {
    "digits": sk_datasets.load_digits,
    "breast_cancer": sk_datasets.load_breast_cancer,
}


@dataclass
class Splits:
    """Standardised train, validation and test splits of one classification data set."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_features: int
    num_classes: int


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Load ``cfg.name`` and split it into train/validation/test deterministically from ``seed``.

    Features are standardised with the training split's mean and standard deviation; a feature
    that is constant on the training split is only centred.
    """
    bunch = _LOADERS[cfg.name]()
    features = np.asarray(bunch.data, dtype=np.float64)
    targets = np.asarray(bunch.target, dtype=np.int64)
    num_examples = len(targets)

    # A private generator: the split must not depend on, or disturb, the global RNG streams.
    order = np.random.default_rng(seed).permutation(num_examples)
    num_test = int(round(cfg.test_fraction * num_examples))
    num_val = int(round(cfg.val_fraction * num_examples))
    test_idx = order[:num_test]
    val_idx = order[num_test : num_test + num_val]
    train_idx = order[num_test + num_val :]

    mean = features[train_idx].mean(axis=0)
    std = features[train_idx].std(axis=0)
    std[std == 0] = 1.0
    standardised = ((features - mean) / std).astype(np.float32)

    def subset(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(standardised[idx]), torch.from_numpy(targets[idx]))

    return Splits(
        train=subset(train_idx),
        val=subset(val_idx),
        test=subset(test_idx),
        num_features=features.shape[1],
        num_classes=int(targets.max()) + 1,
    )


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
