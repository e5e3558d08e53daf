"""Regression data: the UCI split format, scikit-learn's sets and the synthetic 1-D set."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, make_env, run

from dist_bnn.config import ConfigError, DataConfig, load_config
from dist_bnn.data import TOY1D_NUM_EXAMPLES, load_splits, toy1d_arrays

# Standardised training columns have mean 0 and standard deviation 1 up to float32 rounding.
STANDARDISATION_TOLERANCE = 1e-5

# Bound between float32 targets mapped back to original units and the float64 file values.
ORIGINAL_UNITS_REL_TOLERANCE = 1e-6

# The real copy of the benchmark sets, when this checkout sits next to it.
REAL_UCI_DIR = REPO.parent / "shared" / "data" / "uci"

NUM_ROWS = 30
TEST_ROWS = [[2, 5, 11, 17, 23, 29], [0, 1, 2, 3, 4, 5]]


def write_uci_dir(root: Path) -> np.ndarray:
    """Write a 30-row UCI-format set with 2 splits: inputs in columns 0, 2, 3, target in 1.
    Column 4 is unused. Return the table."""
    rng = np.random.default_rng(7)
    table = rng.normal(size=(NUM_ROWS, 5)) * [1.0, 10.0, 3.0, 0.5, 1.0] + [0.0, 50.0, -2.0, 1.0, 0.0]
    root.mkdir(parents=True)
    np.savetxt(root / "data.txt", table)
    (root / "index_features.txt").write_text("0\n2\n3\n")
    (root / "index_target.txt").write_text("1")  # no trailing newline, as in the real files
    for split, test_rows in enumerate(TEST_ROWS):
        train_rows = [row for row in range(NUM_ROWS) if row not in test_rows]
        (root / f"index_train_{split}.txt").write_text("\n".join(map(str, train_rows)) + "\n")
        (root / f"index_test_{split}.txt").write_text("\n".join(map(str, test_rows)) + "\n")
    return table


def uci_config(root: Path, split: int = 0, val_fraction: float = 0.25) -> DataConfig:
    return DataConfig(name="uci", root=str(root), split=split, val_fraction=val_fraction)


def rows_of(dataset, table: np.ndarray, splits) -> set[int]:
    """Map each example of ``dataset`` back to its row of ``table`` through its target."""
    targets = (splits.target_mean + splits.target_std * dataset.tensors[1].double()).numpy()
    return {int(np.argmin(np.abs(table[:, 1] - value))) for value in targets}


def test_uci_split_rows(tmp_path):
    table = write_uci_dir(tmp_path / "set")
    splits = load_splits(uci_config(tmp_path / "set", split=1), seed=0)
    assert splits.num_features == 3
    assert splits.num_classes is None
    assert splits.task == "regression"
    assert rows_of(splits.test, table, splits) == set(TEST_ROWS[1])
    train, val = rows_of(splits.train, table, splits), rows_of(splits.val, table, splits)
    # The validation quarter is carved out of the 24 training rows.
    assert len(val) == 6
    assert len(train) == 18
    assert not train & val
    assert train | val == set(range(NUM_ROWS)) - set(TEST_ROWS[1])


def test_uci_standardised_on_training_rows(tmp_path):
    table = write_uci_dir(tmp_path / "set")
    splits = load_splits(uci_config(tmp_path / "set"), seed=0)
    train_rows = sorted(rows_of(splits.train, table, splits))
    features, targets = splits.train.tensors[0].double(), splits.train.tensors[1].double()
    assert features.mean(dim=0).abs().max() < STANDARDISATION_TOLERANCE
    assert (features.std(dim=0, unbiased=False) - 1).abs().max() < STANDARDISATION_TOLERANCE
    assert abs(targets.mean()) < STANDARDISATION_TOLERANCE
    assert abs(targets.std(unbiased=False) - 1) < STANDARDISATION_TOLERANCE
    assert np.isclose(splits.target_mean, table[train_rows, 1].mean(), rtol=ORIGINAL_UNITS_REL_TOLERANCE)
    assert np.isclose(splits.target_std, table[train_rows, 1].std(), rtol=ORIGINAL_UNITS_REL_TOLERANCE)
    # The test targets come back in original units through the training statistics.
    test_targets = splits.target_mean + splits.target_std * splits.test.tensors[1].double()
    expected = torch.from_numpy(np.sort(table[TEST_ROWS[0], 1]))
    torch.testing.assert_close(test_targets.sort().values, expected, rtol=ORIGINAL_UNITS_REL_TOLERANCE, atol=0)


def test_uci_validation_depends_on_seed_only(tmp_path):
    write_uci_dir(tmp_path / "set")
    first, again = (load_splits(uci_config(tmp_path / "set"), seed=3) for _ in range(2))
    other = load_splits(uci_config(tmp_path / "set"), seed=4)
    assert torch.equal(first.val.tensors[1], again.val.tensors[1])
    assert not torch.equal(first.val.tensors[1], other.val.tensors[1])
    # The test rows come from the split file whatever the seed.
    torch.testing.assert_close(
        original_test_targets(first).sort().values, original_test_targets(other).sort().values,
        rtol=ORIGINAL_UNITS_REL_TOLERANCE, atol=0,
    )


def original_test_targets(splits) -> torch.Tensor:
    return splits.target_mean + splits.target_std * splits.test.tensors[1].double()


def test_uci_without_validation(tmp_path):
    write_uci_dir(tmp_path / "set")
    splits = load_splits(uci_config(tmp_path / "set", val_fraction=0.0), seed=0)
    assert len(splits.val) == 0
    assert len(splits.train) == NUM_ROWS - len(TEST_ROWS[0])


def remove(name: str):
    def damage(root: Path) -> None:
        (root / name).unlink()
    return damage


def write_bad_index(root: Path) -> None:
    (root / "index_test_0.txt").write_text("3\n30\n")


@pytest.mark.parametrize(
    ("damage", "split", "message"),
    [
        (None, 2, "data.split=2 is out of range: {root} has no index_train_2.txt (it has 2 training split file(s)"),
        (remove("index_test_0.txt"), 0, "data.split=0 is out of range: {root} has no index_test_0.txt"),
        (remove("data.txt"), 0, "{root}/data.txt not found; data.root={root} must contain data.txt"),
        (remove("index_target.txt"), 0, "{root}/index_target.txt not found"),
        (write_bad_index, 0, "{root}/index_test_0.txt contains index 30, outside [0, 30)"),
    ],
    ids=["split-out-of-range", "missing-test-index", "missing-data", "missing-target-index", "index-out-of-range"],
)
def test_uci_errors(tmp_path, damage, split, message):
    root = tmp_path / "set"
    write_uci_dir(root)
    if damage is not None:
        damage(root)
    with pytest.raises(ConfigError) as error:
        load_splits(uci_config(root, split=split), seed=0)
    assert message.format(root=root) in str(error.value)


def test_uci_missing_root(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_splits(uci_config(tmp_path / "absent"), seed=0)
    assert f"data.root={tmp_path / 'absent'} is not a directory" in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.name=uci"], "data.name=uci needs data.root"),
        (["data.name=uci", "data.root=x", "data.split=-1"], "data.split=-1 is invalid; allowed: data.split >= 0"),
        (["data.val_fraction=0"], "data.val_fraction=0 leaves no validation examples"),
    ],
    ids=["uci-without-root", "negative-split", "validation-without-examples"],
)
def test_data_config_errors(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["run.dir=unused", *overrides])
    assert message in str(error.value)


def test_root_ignored_outside_uci(tmp_path, caplog):
    load_splits(DataConfig(name="diabetes", root=str(tmp_path)), seed=0)
    assert "data.root and data.split are used by data.name=uci only" in caplog.text


def test_cli_missing_root_exits_2(tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "dist_bnn", "train", f"run.dir={run_dir}", "data.name=uci",
        f"data.root={tmp_path / 'absent'}", "wandb.mode=disabled",
    ]
    result = run(command, make_env(tmp_path))
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"data.root={tmp_path / 'absent'} is not a directory" in result.stderr
    assert not run_dir.exists()


def test_cli_uci_without_root_exits_2(tmp_path):
    result = run([sys.executable, "-m", "dist_bnn", "train", f"run.dir={tmp_path / 'run'}", "data.name=uci"], make_env(tmp_path))
    assert result.returncode == 2
    assert "data.name=uci needs data.root" in result.stderr


@pytest.mark.skipif(not REAL_UCI_DIR.is_dir(), reason=f"the UCI benchmark sets are not at {REAL_UCI_DIR}")
@pytest.mark.parametrize(("name", "rows", "inputs"), [("concrete", 1030, 8), ("energy", 768, 8), ("wine", 1599, 11), ("yacht", 308, 6)])
def test_real_uci_sets(name, rows, inputs):
    for split in (0, 19):
        splits = load_splits(DataConfig(name="uci", root=str(REAL_UCI_DIR / name), split=split, val_fraction=0.0), seed=0)
        assert splits.num_features == inputs
        assert len(splits.train) + len(splits.test) == rows
        assert abs(splits.train.tensors[1].double().mean()) < STANDARDISATION_TOLERANCE


@pytest.mark.parametrize(("name", "examples", "inputs", "task"), [("wine", 178, 13, "classification"), ("diabetes", 442, 10, "regression")])
def test_sklearn_sets(name, examples, inputs, task):
    splits = load_splits(DataConfig(name=name), seed=0)
    assert len(splits.train) + len(splits.val) + len(splits.test) == examples
    assert splits.num_features == inputs
    assert splits.task == task
    assert splits.train.tensors[1].dtype == (torch.int64 if task == "classification" else torch.float32)


def test_toy1d_fixed_across_seeds():
    features, targets = toy1d_arrays()
    again_features, again_targets = toy1d_arrays()
    assert features.shape == (TOY1D_NUM_EXAMPLES, 1)
    assert np.array_equal(features, again_features)
    assert np.array_equal(targets, again_targets)
    # The inputs leave a gap in (-0.5, 0.5), where the predictive band should widen.
    assert not np.any(np.abs(features) < 0.5)
    first, other = load_splits(DataConfig(name="toy1d"), seed=0), load_splits(DataConfig(name="toy1d"), seed=1)
    all_first = torch.cat([first.train.tensors[1], first.val.tensors[1], first.test.tensors[1]])
    all_other = torch.cat([other.train.tensors[1], other.val.tensors[1], other.test.tensors[1]])
    assert len(all_first) == len(all_other) == TOY1D_NUM_EXAMPLES
    assert not torch.equal(first.test.tensors[0], other.test.tensors[0])


def test_uci_benchmark_script_runs(tmp_path):
    write_uci_dir(tmp_path / "data" / "yacht")
    command = [
        sys.executable, str(REPO / "benchmarks" / "uci.py"), str(tmp_path / "data"), "--datasets", "yacht",
        "--splits", "2", "--steps", "30", "--samples", "3", "--batch-size", "8", "--json", str(tmp_path / "out.json"),
    ]
    result = run(command, make_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| yacht | 2 |" in result.stdout
    rows = json.loads((tmp_path / "out.json").read_text())["results"]["yacht"]
    assert [row["num_samples"] for row in rows] == [3, 3]
