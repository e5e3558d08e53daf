"""Data splits and the per-epoch distributed order, including the first epoch after a resume."""

from __future__ import annotations

import torch
from ignite.engine import Engine
from sklearn.datasets import load_wine

from dist_bnn.config import DataConfig
from dist_bnn.data import ShardSampler, attach_sampler_epoch, build_train_loader, load_splits

SEED = 3
# Standardised training features have mean 0 and standard deviation 1 up to float32 rounding.
STANDARDISATION_TOLERANCE = 1e-5
# Inputs mapped back from float32 standardised values, relative to the largest raw input.
RAW_ROUND_TRIP_TOLERANCE = 1e-5


def feature_rows(dataset) -> set[bytes]:
    return {row.numpy().tobytes() for row in dataset.tensors[0]}


def test_splits_deterministic_from_seed():
    first, second = load_splits(DataConfig(), SEED), load_splits(DataConfig(), SEED)
    other = load_splits(DataConfig(), SEED + 1)
    assert torch.equal(first.train.tensors[0], second.train.tensors[0])
    assert torch.equal(first.test.tensors[1], second.test.tensors[1])
    assert not torch.equal(first.train.tensors[1], other.train.tensors[1])


def test_splits_disjoint_and_complete():
    splits = load_splits(DataConfig(name="breast_cancer"), SEED)
    sizes = [len(splits.train), len(splits.val), len(splits.test)]
    assert sum(sizes) == 569
    assert splits.num_classes == 2
    assert splits.num_features == 30
    train, val, test = feature_rows(splits.train), feature_rows(splits.val), feature_rows(splits.test)
    assert not train & val
    assert not train & test
    assert not val & test


def test_standardised_on_train_split():
    splits = load_splits(DataConfig(name="breast_cancer"), SEED)
    features = splits.train.tensors[0].double()
    assert features.mean(dim=0).abs().max() < STANDARDISATION_TOLERANCE
    assert (features.std(dim=0, unbiased=False) - 1).abs().max() < STANDARDISATION_TOLERANCE


def test_feature_statistics_map_back_to_raw_inputs():
    splits = load_splits(DataConfig(name="wine"), SEED)
    raw = torch.from_numpy(load_wine().data)
    mapped = torch.tensor(splits.feature_mean) + torch.tensor(splits.feature_std) * splits.test.tensors[0].double()
    # Every mapped test row is one of the raw rows, up to float32 rounding of the standardised values.
    distances = torch.cdist(mapped, raw).min(dim=1).values
    assert len(splits.feature_mean) == len(splits.feature_std) == raw.shape[1]
    assert distances.max() < RAW_ROUND_TRIP_TOLERANCE * raw.abs().max()


def run_orders(loaders, epochs: int, resume_from_epoch: int = 0) -> list[list[list[int]]]:
    """Return orders[epoch][rank] = example indices seen, running each rank's loader in an engine."""
    orders = []
    for rank, loader in enumerate(loaders):
        seen: dict[int, list[int]] = {}

        def step(engine, batch, seen=seen):
            seen.setdefault(engine.state.epoch, []).extend(batch[1].tolist())

        engine = Engine(step)
        attach_sampler_epoch(engine, loader)
        if resume_from_epoch:
            engine.load_state_dict(
                {"epoch": resume_from_epoch, "epoch_length": len(loader), "max_epochs": epochs}
            )
        engine.run(loader, max_epochs=epochs)
        for epoch, indices in seen.items():
            while len(orders) <= epoch - 1 - resume_from_epoch:
                orders.append([None] * len(loaders))
            orders[epoch - 1 - resume_from_epoch][rank] = indices
    return orders


def index_loaders(world_size: int, num_examples: int = 100, batch_size: int = 8):
    # The "targets" are the example indices, so a batch reveals which examples it holds.
    dataset = torch.utils.data.TensorDataset(torch.zeros(num_examples, 1), torch.arange(num_examples))
    return [
        build_train_loader(dataset, batch_size, world_size, rank, shuffle=True, seed=SEED)
        for rank in range(world_size)
    ]


def test_epochs_draw_different_orders():
    orders = run_orders(index_loaders(world_size=2), epochs=3)
    for rank in range(2):
        assert orders[0][rank] != orders[1][rank]
        assert orders[1][rank] != orders[2][rank]
        assert orders[0][rank] != orders[2][rank]


def test_rank_shards_disjoint_and_cover():
    # 96 examples and a global batch of 8: drop_last drops nothing, so each epoch covers all.
    orders = run_orders(index_loaders(world_size=2, num_examples=96, batch_size=8), epochs=3)
    for epoch in orders:
        assert not set(epoch[0]) & set(epoch[1])
        assert sorted(epoch[0] + epoch[1]) == list(range(96))


def test_drop_last_equal_steps_per_rank():
    # 100 examples over 2 ranks with 4 per rank-batch: 12 full batches each, 4 examples dropped.
    loaders = index_loaders(world_size=2, num_examples=100, batch_size=8)
    assert [len(loader) for loader in loaders] == [12, 12]


def test_resumed_epoch_repeats_uninterrupted_order():
    uninterrupted = run_orders(index_loaders(world_size=2), epochs=3)
    resumed = run_orders(index_loaders(world_size=2), epochs=3, resume_from_epoch=2)
    assert resumed == [uninterrupted[2]]


def test_shard_sampler_no_padding():
    shards = [list(ShardSampler(101, 4, rank)) for rank in range(4)]
    assert sorted(sum(shards, [])) == list(range(101))
    assert [len(shard) for shard in shards] == [26, 25, 25, 25]
