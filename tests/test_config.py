"""Tests of config loading and of config errors on the command line.

Every bad input raises ConfigError naming the key, the value and what is allowed. Good files load
with typed values. The command line exits with code 2 on a bad config and writes nothing."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dist_bnn.config import Config, ConfigError, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
DIGITS_CONFIG = CONFIG_DIR / "digits_sghmc.yaml"

# Upper bound for one `dist-bnn train` that fails on its config, so a hang fails the test.
CLI_TIMEOUT_S = 120

# Stands for "pass the path of a file that does not exist" in the `config` field of BadInput.
MISSING_FILE = object()


@dataclass(frozen=True)
class BadInput:
    """An invalid configuration and the text its ConfigError message must contain."""

    overrides: tuple[str, ...]
    """Overrides passed to load_config. Most rows set run.dir, so that it is not the error."""
    fragments: tuple[str, ...]
    """Substrings of the message: the dotted key, the offending value, what is allowed."""
    config: object = None
    """None for no YAML file, a string for the YAML text of a file, or MISSING_FILE."""


BAD_INPUTS = [
    pytest.param(
        BadInput(
            ("run.dir=r", "trainig.num_epochs=3"),
            ("trainig", "valid keys", "training", "sampler", "did you mean training?"),
        ),
        id="unknown-section",
    ),
    pytest.param(
        BadInput(
            ("run.dir=r", "training.num_epoch=3"),
            ("training.num_epoch", "num_epochs, seed", "did you mean training.num_epochs?"),
        ),
        id="unknown-key-in-section",
    ),
    pytest.param(
        BadInput(("run.dir=r", "training.num_epochs=abc"), ("training.num_epochs", "'abc'", "int")),
        id="epochs-not-int",
    ),
    pytest.param(
        BadInput(("run.dir=r", "training.num_epochs=1.5"), ("training.num_epochs", "1.5", "int")),
        id="epochs-fractional",
    ),
    pytest.param(
        BadInput(("run.dir=r", "model.hidden_sizes=3"), ("model.hidden_sizes", "3", "list[int]")),
        id="hidden-sizes-scalar",
    ),
    pytest.param(
        BadInput(
            ("run.dir=r", "model.hidden_sizes=[10,abc]"),
            ("model.hidden_sizes[1]", "'abc'", "list[int]"),
        ),
        id="hidden-sizes-bad-item",
    ),
    pytest.param(
        BadInput(("run.dir=r", "model.hidden_sizes=[0]"), ("model.hidden_sizes[0]", "0", ">= 1")),
        id="hidden-size-zero",
    ),
    pytest.param(
        BadInput(("run.dir=r", "run.resume=maybe"), ("run.resume", "'maybe'", "bool")),
        id="resume-not-bool",
    ),
    pytest.param(
        BadInput(("run.dir=r", "sampler.lr=abc"), ("sampler.lr", "'abc'", "float")),
        id="lr-not-float",
    ),
    pytest.param(
        BadInput(("run.dir=r", "training.num_epochs=-1"), ("training.num_epochs=-1", "training.num_epochs >= 1")),
        id="epochs-negative",
    ),
    pytest.param(
        BadInput(("run.dir=r", "training.num_epochs=0"), ("training.num_epochs=0", "training.num_epochs >= 1")),
        id="epochs-zero",
    ),
    pytest.param(
        BadInput(
            ("run.dir=r", "training.num_epochs=5", "samples.start_epoch=6"),
            ("samples.start_epoch=6", "training.num_epochs=5", "samples.start_epoch <= training.num_epochs"),
        ),
        id="start-epoch-after-last",
    ),
    pytest.param(
        BadInput(("run.dir=r", "sampler.name=adam"), ("sampler.name", "'adam'", "sgld, sghmc, psgld")),
        id="sampler-name",
    ),
    pytest.param(
        BadInput(("run.dir=r", "wandb.mode=cloud"), ("wandb.mode", "'cloud'", "offline, online, disabled")),
        id="wandb-mode",
    ),
    pytest.param(
        BadInput(("run.dir=r", "distributed.backend=mpi"), ("distributed.backend", "'mpi'", "auto, gloo, nccl")),
        id="backend",
    ),
    pytest.param(
        BadInput(("run.dir=r", "sampler.lr=0"), ("sampler.lr=0", "sampler.lr > 0")),
        id="lr-zero",
    ),
    pytest.param(
        BadInput(("run.dir=r", "sampler.momentum=1"), ("sampler.momentum=1", "[0, 1)")),
        id="momentum-one",
    ),
    pytest.param(
        BadInput(("run.dir=r", "sampler.temperature=-1"), ("sampler.temperature=-1", ">= 0")),
        id="temperature-negative",
    ),
    pytest.param(
        BadInput(("run.dir=r", "sampler.temperature=.nan"), ("sampler.temperature=nan", ">= 0")),
        id="temperature-nan",
    ),
    pytest.param(
        BadInput(("run.dir=r", "sampler.prior_std=0"), ("sampler.prior_std=0", "sampler.prior_std > 0")),
        id="prior-std-zero",
    ),
    pytest.param(
        BadInput(("run.dir=r", "sampler.schedule=linear"), ("sampler.schedule", "'linear'", "constant, cyclical")),
        id="schedule-name",
    ),
    pytest.param(
        BadInput(("run.dir=r", "sampler.cycle_epochs=0"), ("sampler.cycle_epochs=0", "sampler.cycle_epochs >= 1")),
        id="cycle-epochs-zero",
    ),
    pytest.param(
        BadInput(("run.dir=r", "sampler.cycle_epochs=2.5"), ("sampler.cycle_epochs", "2.5", "int")),
        id="cycle-epochs-fractional",
    ),
    pytest.param(
        BadInput(
            ("run.dir=r", "sampler.exploration_fraction=1"),
            ("sampler.exploration_fraction=1", "[0, 1)"),
        ),
        id="exploration-fraction-one",
    ),
    pytest.param(
        BadInput(
            ("run.dir=r", "sampler.exploration_fraction=-0.1"),
            ("sampler.exploration_fraction=-0.1", "[0, 1)"),
        ),
        id="exploration-fraction-negative",
    ),
    pytest.param(
        BadInput(
            ("run.dir=r", "sampler.schedule=cyclical", "sampler.cycle_epochs=10", "sampler.exploration_fraction=0.95"),
            ("sampler.exploration_fraction=0.95", "sampler.cycle_epochs=10", "no epoch wholly in the sampling phase", "<= (cycle_epochs - 1) / cycle_epochs = 0.9"),
        ),
        id="no-sampling-epoch-per-cycle",
    ),
    pytest.param(
        BadInput(
            ("run.dir=r", "sampler.schedule=cyclical", "sampler.cycle_epochs=1", "sampler.exploration_fraction=0.5"),
            ("sampler.exploration_fraction=0.5", "sampler.cycle_epochs=1", "no epoch wholly in the sampling phase"),
        ),
        id="one-epoch-cycle-with-exploration",
    ),
    pytest.param(
        BadInput(
            (
                "run.dir=r", "sampler.schedule=cyclical", "sampler.cycle_epochs=10",
                "sampler.exploration_fraction=0.5", "training.num_epochs=5", "samples.start_epoch=1",
            ),
            ("samples.start_epoch=1", "training.num_epochs=5", "the last 5 of every sampler.cycle_epochs=10", "no posterior sample"),
        ),
        id="no-sample-before-last-epoch",
    ),
    pytest.param(
        BadInput(
            (
                "run.dir=r", "sampler.schedule=cyclical", "sampler.cycle_epochs=4",
                "sampler.exploration_fraction=0.6", "training.num_epochs=1000",
                "samples.start_epoch=1", "samples.every_epochs=4",
            ),
            ("samples.every_epochs=4", "no posterior sample"),
        ),
        id="thinning-misses-sampling-phases",
    ),
    pytest.param(
        BadInput(("run.dir=r", "sampler.psgld_decay=1"), ("sampler.psgld_decay=1", "[0, 1)")),
        id="psgld-decay-one",
    ),
    pytest.param(
        BadInput(("run.dir=r", "sampler.psgld_epsilon=0"), ("sampler.psgld_epsilon=0", "sampler.psgld_epsilon > 0")),
        id="psgld-epsilon-zero",
    ),
    pytest.param(
        BadInput(("run.dir=r", "data.batch_size=0"), ("data.batch_size=0", "data.batch_size >= 1")),
        id="batch-size-zero",
    ),
    pytest.param(
        BadInput((), ("missing", "run.dir", "run.dir=runs/digits")),
        id="run-dir-missing",
    ),
    pytest.param(
        BadInput(("run.dir=",), ("run.dir", "empty", "run.dir=runs/digits")),
        id="run-dir-empty",
    ),
    pytest.param(
        BadInput(("run.dir=r", "sampler.lr"), ("'sampler.lr'", "key=value")),
        id="override-without-equals",
    ),
    pytest.param(
        BadInput(("run.dir=r", "a..b=3"), ("'a..b=3'", "dotted key")),
        id="override-empty-key-part",
    ),
    pytest.param(
        BadInput(("run.dir=r", "model=3"), ("model", "mapping", "3")),
        id="section-is-scalar",
    ),
    pytest.param(
        BadInput(("run.dir=r",), ("config.yaml", "mapping", "list"), config="- run\n- data\n"),
        id="yaml-not-mapping",
    ),
    pytest.param(
        BadInput(("run.dir=r",), ("config.yaml", "not valid YAML"), config="run: [\n"),
        id="yaml-invalid-syntax",
    ),
    pytest.param(
        BadInput(
            ("run.dir=r",),
            ("sampler.nme", "config.yaml", "did you mean sampler.name?"),
            config="sampler:\n  nme: sgld\n",
        ),
        id="yaml-unknown-key",
    ),
    pytest.param(
        BadInput(
            ("run.dir=r",),
            ("data.batch_size", "'many'", "config.yaml", "int"),
            config="data:\n  batch_size: many\n",
        ),
        id="yaml-wrong-type",
    ),
    pytest.param(
        BadInput(("run.dir=r",), ("missing.yaml", "not found"), config=MISSING_FILE),
        id="yaml-missing-file",
    ),
]


def config_path(bad: BadInput, tmp_path: Path) -> Path | None:
    """Return the YAML path a row passes to load_config, writing the file when it has text."""
    if bad.config is None:
        return None
    if bad.config is MISSING_FILE:
        return tmp_path / "missing.yaml"
    path = tmp_path / "config.yaml"
    path.write_text(bad.config)
    return path


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_bad_input_message(bad: BadInput, tmp_path: Path) -> None:
    path = config_path(bad, tmp_path)

    with pytest.raises(ConfigError) as caught:
        load_config(path, bad.overrides)

    message = str(caught.value)
    for fragment in bad.fragments:
        assert fragment in message, f"{fragment!r} missing from the message: {message}"


def test_digits_config_with_overrides(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        f"run.dir={run_dir}",
        "run.resume=false",
        "model.hidden_sizes=[64, 32]",
        "sampler.name=sgld",
        "sampler.lr=1e-3",
        "sampler.temperature=0",
        "training.num_epochs=30",
        "samples.start_epoch=10",
        "data.shuffle=no",
    ]

    cfg = load_config(DIGITS_CONFIG, overrides)

    assert cfg.run.dir == str(run_dir)
    assert cfg.run.resume is False
    assert cfg.model.hidden_sizes == [64, 32]
    assert all(type(width) is int for width in cfg.model.hidden_sizes)
    assert cfg.sampler.name == "sgld"
    assert cfg.sampler.lr == 1e-3
    assert type(cfg.sampler.lr) is float
    assert cfg.sampler.temperature == 0.0
    assert type(cfg.sampler.temperature) is float
    assert cfg.training.num_epochs == 30
    assert type(cfg.training.num_epochs) is int
    assert cfg.samples.start_epoch == 10
    assert cfg.data.shuffle is False


def test_digits_config_keeps_yaml_values(tmp_path: Path) -> None:
    """Every key of the YAML file that no override touches reaches the config unchanged."""
    from_file = yaml.safe_load(DIGITS_CONFIG.read_text())

    loaded = to_dict(load_config(DIGITS_CONFIG, [f"run.dir={tmp_path / 'run'}"]))

    for section, values in from_file.items():
        for key, value in values.items():
            if (section, key) == ("run", "dir"):
                continue
            assert loaded[section][key] == value, f"{section}.{key}"


def test_cyclical_and_psgld_fields_load(tmp_path: Path) -> None:
    overrides = [
        f"run.dir={tmp_path}",
        "sampler.name=psgld",
        "sampler.schedule=cyclical",
        "sampler.cycle_epochs=8",
        "sampler.exploration_fraction=0.75",
        "sampler.psgld_decay=0.9",
        "sampler.psgld_epsilon=1e-4",
        "training.num_epochs=16",
        "samples.start_epoch=1",
    ]

    sampler = load_config(None, overrides).sampler

    assert sampler.name == "psgld"
    assert sampler.schedule == "cyclical"
    assert sampler.cycle_epochs == 8
    assert type(sampler.cycle_epochs) is int
    assert sampler.exploration_fraction == 0.75
    assert sampler.psgld_decay == 0.9
    assert sampler.psgld_epsilon == 1e-4
    assert type(sampler.psgld_epsilon) is float


def test_sampler_defaults_constant_schedule(tmp_path: Path) -> None:
    sampler = load_config(None, [f"run.dir={tmp_path}"]).sampler

    assert sampler.schedule == "constant"
    assert 0 <= sampler.exploration_fraction < 1
    assert sampler.cycle_epochs >= 1


def test_later_override_wins(tmp_path: Path) -> None:
    cfg = load_config(None, [f"run.dir={tmp_path}", "sampler.lr=0.1", "sampler.lr=0.2"])

    assert cfg.sampler.lr == 0.2


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda path: path.name)
def test_shipped_config_loads(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path, [f"run.dir={tmp_path / 'run'}"])

    assert isinstance(cfg, Config)
    assert cfg.run.dir == str(tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# Command line


CLI_BAD_INPUTS = [
    pytest.param(("training.num_epoch=3",), "training.num_epoch", id="unknown-key"),
    pytest.param(("training.num_epochs=abc",), "training.num_epochs", id="wrong-type"),
    pytest.param(("sampler.name=adam",), "sampler.name", id="sampler-name"),
    pytest.param(
        ("training.num_epochs=5", "samples.start_epoch=6"), "samples.start_epoch", id="start-epoch"
    ),
]


@pytest.mark.parametrize(("overrides", "key"), CLI_BAD_INPUTS)
def test_cli_bad_input_writes_nothing(
    overrides: tuple[str, ...], key: str, tmp_path: Path, env: dict[str, str]
) -> None:
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "dist_bnn", "train",
        str(DIGITS_CONFIG), f"run.dir={run_dir}", *overrides,
    ]

    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S
    )

    assert result.returncode == 2, result.stderr
    assert "dist-bnn: error:" in result.stderr
    assert key in result.stderr
    assert not run_dir.exists()
    assert list(tmp_path.iterdir()) == []
