"""Typed configuration: YAML files and ``key=value`` overrides mapped onto dataclasses.

Every section of a YAML file in ``configs/`` maps one to one onto a dataclass below. Loading goes
YAML -> OmegaConf structured config (type conversion) -> dataclasses -> :func:`validate`. Any
problem raises :class:`ConfigError` naming the dotted key as the user typed it, the value received,
what is allowed and how to fix it. This module imports nothing else of the package.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CLASSIFICATION_DATASETS = ("digits", "breast_cancer", "wine")
REGRESSION_DATASETS = ("diabetes", "uci", "toy1d")
DATASETS = CLASSIFICATION_DATASETS + REGRESSION_DATASETS
SAMPLERS = ("sgld", "sghmc", "psgld")
SCHEDULES = ("constant", "cyclical")
ACTIVATIONS = ("relu", "tanh")
WANDB_MODES = ("offline", "online", "disabled")
BACKENDS = ("auto", "gloo", "nccl")
NOISE_MODES = ("fixed", "inferred")
# Metrics that can rank checkpoints, per task: validation metrics exist only for their task.
BEST_METRICS = ("val/nll", "val/accuracy", "val/rmse", "train/loss")
_TASK_METRICS = {"classification": "val/accuracy", "regression": "val/rmse"}
BEST_MODES = ("min", "max")


class ConfigError(ValueError):
    """Invalid configuration: an unknown key, a wrong type or an impossible value."""


@dataclass
class RunConfig:
    dir: str = MISSING
    """Run directory holding samples, checkpoints, metrics and the W&B run. Required: a relaunch
    on the same directory resumes the run."""
    resume: bool = True
    """Resume from the newest checkpoint in ``run.dir`` when there is one. With ``false`` a run
    directory that already contains checkpoints is an error, so nothing is overwritten."""


@dataclass
class DataConfig:
    name: str = "digits"
    """Data set. Classification, from scikit-learn: ``digits`` (10 classes), ``breast_cancer``
    (2), ``wine`` (3). Regression: ``diabetes`` (scikit-learn), ``uci`` (a directory in the UCI
    split format, see ``data.root``) or ``toy1d`` (a synthetic 1-D set with a gap in its inputs)."""
    root: str | None = None
    """Directory of a data set in the UCI split format, for ``data.name=uci``: ``data.txt``,
    ``index_features.txt``, ``index_target.txt``, ``index_train_K.txt``, ``index_test_K.txt``."""
    split: int = 0
    """Index K of the train/test split of ``data.name=uci``; its test set replaces
    ``data.test_fraction``."""
    batch_size: int = 64
    """Global mini-batch size in examples, summed over all ranks. Must divide by the world size."""
    val_fraction: float = 0.15
    """Fraction of all examples held out for validation, in [0, 1); with ``data.name=uci``, the
    fraction of the split's training examples."""
    test_fraction: float = 0.2
    """Fraction of all examples held out for the final test, in (0, 1). Unused by
    ``data.name=uci``, whose split files fix the test set."""
    shuffle: bool = True
    """Shuffle the training set every epoch (a different, seeded order per epoch)."""
    eval_batch_size: int = 512
    """Per-rank batch size in examples for validation and test evaluation; it does not change
    the chain."""


@dataclass
class ModelConfig:
    hidden_sizes: list[int] = field(default_factory=lambda: [100])
    """Width of each hidden layer of the MLP; an empty list gives a linear model."""
    activation: str = "relu"
    """Hidden-layer non-linearity: ``relu`` or ``tanh``."""


@dataclass
class LikelihoodConfig:
    """Observation noise of the Gaussian likelihood of regression data sets. Classification
    data sets use a categorical likelihood and no key of this section."""

    noise: str = "inferred"
    """``fixed``: the noise standard deviation is ``likelihood.noise_std``. ``inferred``: its
    logarithm is a parameter of the model with a Gaussian prior of its own, sampled with the
    weights."""
    noise_std: float | None = None
    """Noise standard deviation in the target's original units. ``fixed`` needs it; for
    ``inferred`` it is the median of the log-normal prior, and ``null`` takes the training
    split's target standard deviation."""
    log_noise_prior_std: float = 1.0
    """Standard deviation of the Gaussian prior on the natural log of the noise standard
    deviation (``inferred`` only)."""


@dataclass
class SamplerConfig:
    name: str = "sghmc"
    """Stochastic-gradient MCMC method: ``sgld``, ``sghmc`` or ``psgld`` (SGLD with an
    RMSprop-style diagonal preconditioner)."""
    lr: float = 0.05
    """Step size applied to the gradient of the mean loss (per-example scale, not multiplied by
    the training-set size). Never rescaled with the world size. With
    ``sampler.schedule=cyclical`` it is the largest step size, taken at the start of each
    cycle."""
    momentum: float = 0.9
    """SGHMC momentum, one minus the friction, in [0, 1). Ignored by SGLD and pSGLD, with a
    warning."""
    temperature: float = 1.0
    """Posterior temperature: 1 samples the Bayesian posterior, 0 disables the noise. With 0 the
    sampler optimises the log posterior and the run is the MAP baseline (SGHMC at temperature 0
    is SGD with momentum, and the Gaussian prior acts as weight decay)."""
    prior_std: float = 1.0
    """Standard deviation of the zero-mean isotropic Gaussian prior on every weight."""
    schedule: str = "constant"
    """Step-size schedule: ``constant`` (``sampler.lr`` at every step, noise always on) or
    ``cyclical``. The cyclical schedule repeats a cosine decay of the step size every
    ``sampler.cycle_epochs`` epochs, and each cycle starts with a noise-free exploration phase
    (cSGLD and cSGHMC of Zhang et al., ICLR 2020; see :mod:`dist_bnn.samplers.schedules`)."""
    cycle_epochs: int = 10
    """Length of one step-size cycle in epochs (>= 1). Used by ``sampler.schedule=cyclical``
    only; ignored, with a warning, by ``constant``."""
    exploration_fraction: float = 0.5
    """Fraction of each cycle, in [0, 1), run without noise before the sampling phase begins.
    0 keeps the noise on throughout. Only epochs that lie wholly in the sampling phase write
    posterior samples, so the last epoch of a cycle must lie in it: exploration_fraction <=
    (cycle_epochs - 1) / cycle_epochs. Used by ``sampler.schedule=cyclical`` only."""
    psgld_decay: float = 0.99
    """pSGLD: decay rate in [0, 1) of the running average of squared gradients (RMSprop's
    alpha). Used by ``sampler.name=psgld`` only."""
    psgld_epsilon: float = 1e-5
    """pSGLD: positive constant added to the root of the running average, which bounds the
    preconditioner by 1 / psgld_epsilon. Used by ``sampler.name=psgld`` only."""


@dataclass
class TrainingConfig:
    num_epochs: int = 50
    """Total number of epochs of the run, counting epochs done before any resume. Raising it
    on a finished run continues the chain; a value below the epochs already trained is an
    error."""
    seed: int = 0
    """Seed of the data split, the model initialisation, the data order and the Langevin noise."""
    validate_every_epochs: int = 1
    """Validate the current weights every this many epochs; 0 disables per-epoch validation."""


@dataclass
class SamplesConfig:
    start_epoch: int = 25
    """First epoch (1-based) whose weights may be written as a posterior sample: the burn-in
    ends before it. See :func:`is_sample_epoch` for the full rule."""
    every_epochs: int = 1
    """Epochs between two posterior samples (thinning), counted from ``samples.start_epoch``.
    With a cyclical schedule, epochs of this grid that are not wholly in a sampling phase are
    skipped."""


@dataclass
class CheckpointConfig:
    every_epochs: int = 5
    """Epochs between two checkpoints. The last epoch is always checkpointed, and a preemption
    signal adds one at the next iteration."""
    keep_last: int | None = None
    """Number of newest checkpoints to keep (>= 1); ``null`` keeps every checkpoint. Older ones
    are deleted only after a newer one is committed."""
    keep_best: int = 0
    """Number of best checkpoints by ``checkpoint.best_metric`` kept besides the newest ones
    (only with ``checkpoint.keep_last`` set); 0 keeps none for their metric."""
    best_metric: str = "val/nll"
    """Metric that ranks checkpoints for ``checkpoint.keep_best``: ``val/nll``, ``train/loss``,
    ``val/accuracy`` (classification) or ``val/rmse`` (regression, in the target's units)."""
    best_mode: str = "min"
    """``min`` if a smaller ``checkpoint.best_metric`` is better, ``max`` if a larger one is."""
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that ask for a checkpoint at the next iteration and an exit with code 75; an
    empty list leaves every signal's default action."""
    async_save: bool = False
    """Write the periodic checkpoints in a background thread (``dcp.async_save``) while training
    continues; training blocks only while the state is copied. At most one save is in flight. A
    checkpoint is committed (its manifest written, W&B rows sent, older checkpoints pruned) when
    the next save starts or the run ends. The last epoch's save and a preemption save are
    always synchronous."""


@dataclass
class WandbConfig:
    mode: str = "offline"
    """``offline`` (default, no network), ``online`` (needs a W&B account) or ``disabled``."""
    project: str = "dist-bnn"
    """W&B project name; must not be empty."""
    entity: str | None = None
    """W&B entity (user or team); ``null`` uses the account's default."""
    name: str | None = None
    """Display name of the W&B run; ``null`` lets W&B choose one."""


@dataclass
class DistributedConfig:
    backend: str = "auto"
    """Process-group backend under a launcher: ``auto`` (NCCL with GPUs, gloo otherwise),
    ``gloo`` or ``nccl``. A plain process started without a launcher uses no process group."""
    timeout_s: float = 1800.0
    """Timeout in seconds of every collective operation (torch's default is 1800). A rank that
    waits longer for the others (during a save, for example) fails and the launcher stops the
    job. The next launch resumes from the newest committed checkpoint."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# Sections and keys that decide the trajectory of the chain. Resuming a run with any of them
# changed would mix two different chains in one run directory, so it is rejected.
TRAJECTORY_KEYS = ("data", "model", "likelihood", "sampler", "samples", "training.seed")


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Build a validated :class:`Config` from an optional YAML file and dotted overrides.

    Args:
        path: YAML file whose top-level keys are config sections, or ``None`` for defaults only.
        overrides: ``key=value`` strings such as ``sampler.lr=0.01``; later ones win.

    Raises:
        ConfigError: on a missing file, invalid YAML, an unknown key, a wrong type or an
            impossible value.
    """
    layers = []
    if path is not None:
        layers.append((str(path), _read_yaml(Path(path))))
    if overrides:
        layers.append(("command line", _parse_overrides(overrides)))

    schema = OmegaConf.structured(Config)
    for source, layer in layers:
        _check_keys(layer, Config, prefix="", source=source)
        try:
            schema = OmegaConf.merge(schema, layer)
        except OmegaConfBaseException as err:
            raise _wrap_omegaconf_error(err, source) from None
    missing = sorted(OmegaConf.missing_keys(schema))
    if missing:
        raise ConfigError(
            f"missing required key(s) {', '.join(missing)}; set them in the YAML file or on the "
            f"command line, for example {missing[0]}=runs/digits"
        )
    cfg = OmegaConf.to_object(schema)
    assert isinstance(cfg, Config)
    validate(cfg)
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass the path of a YAML file in configs/")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must contain a mapping of sections (run, data, ...), "
            f"got {type(data).__name__}"
        )
    return data


def _parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"invalid override {item!r}: expected key=value with a dotted key, "
                f"for example training.num_epochs=20"
            )
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"invalid value in override {item!r}: {err}") from None
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part}")
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"override {item!r} would replace the earlier overrides of {key}.*")
        node[parts[-1]] = value
    return tree


def _check_keys(layer: Any, schema: type, prefix: str, source: str) -> None:
    """Reject keys that the dataclass ``schema`` does not define, listing the valid ones."""
    if not isinstance(layer, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'} (from {source}): expected a mapping of keys, "
            f"got {layer!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            valid = ", ".join(sorted(fields))
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(
                f"unknown config key {dotted} (from {source}); valid keys here: {valid}{hint}"
            )
        field_type = fields[key].type
        nested = _dataclass_of(field_type)
        if nested is not None:
            _check_keys(value, nested, prefix=f"{dotted}.", source=source)


def _dataclass_of(field_type: Any) -> type | None:
    # Annotations are strings under `from __future__ import annotations`.
    if isinstance(field_type, str):
        return _SECTIONS.get(field_type)
    return field_type if dataclasses.is_dataclass(field_type) else None


def _wrap_omegaconf_error(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "config"
    value = getattr(err, "value", None)
    return ConfigError(
        f"invalid value for {key} (from {source}): got {value!r}, expected "
        f"{_expected_type(key)}; fix the value in the YAML file or the override"
    )


def _expected_type(dotted_key: str) -> str:
    """Describe the annotated type of a dotted key, e.g. ``int`` or ``list[int]``."""
    schema: Any = Config
    annotation: Any = "a value of the declared type"
    for part in dotted_key.split("."):
        part = part.split("[")[0]
        fields = {f.name: f for f in dataclasses.fields(schema)} if schema else {}
        if part not in fields:
            break
        annotation = fields[part].type
        schema = _dataclass_of(annotation)
    return str(annotation)


_SECTIONS = {
    cls.__name__: cls
    for cls in (
        RunConfig,
        DataConfig,
        ModelConfig,
        LikelihoodConfig,
        SamplerConfig,
        TrainingConfig,
        SamplesConfig,
        CheckpointConfig,
        WandbConfig,
        DistributedConfig,
    )
}


# ---------------------------------------------------------------------------------------------
# Validation


def validate(cfg: Config) -> None:
    """Check every value that has a type-correct but impossible setting.

    Raises:
        ConfigError: naming the first invalid key, its value, what is allowed and the fix.
    """
    _choice("data.name", cfg.data.name, DATASETS)
    _choice("model.activation", cfg.model.activation, ACTIVATIONS)
    _choice("sampler.name", cfg.sampler.name, SAMPLERS)
    _choice("wandb.mode", cfg.wandb.mode, WANDB_MODES)
    _choice("distributed.backend", cfg.distributed.backend, BACKENDS)
    if not 0 < cfg.distributed.timeout_s < math.inf:
        raise ConfigError(
            f"distributed.timeout_s={cfg.distributed.timeout_s!r} must be a positive number of "
            f"seconds, for example distributed.timeout_s=1800"
        )

    if not cfg.run.dir.strip():
        raise ConfigError("run.dir is empty; set it to a directory path, e.g. run.dir=runs/digits")
    _at_least("data.batch_size", cfg.data.batch_size, 1)
    _at_least("data.eval_batch_size", cfg.data.eval_batch_size, 1)
    _in_range("data.val_fraction", cfg.data.val_fraction, 0.0, 1.0, low_open=False)
    _in_range("data.test_fraction", cfg.data.test_fraction, 0.0, 1.0, low_open=True)
    _validate_data_source(cfg.data)
    if cfg.data.name != "uci" and cfg.data.val_fraction + cfg.data.test_fraction >= 0.9:
        raise ConfigError(
            f"data.val_fraction + data.test_fraction = "
            f"{cfg.data.val_fraction + cfg.data.test_fraction:g} leaves under 10% of the data for "
            f"training; lower one of them"
        )
    for i, width in enumerate(cfg.model.hidden_sizes):
        _at_least(f"model.hidden_sizes[{i}]", width, 1)

    _validate_likelihood(cfg.likelihood)

    _positive("sampler.lr", cfg.sampler.lr)
    _in_range("sampler.momentum", cfg.sampler.momentum, 0.0, 1.0, low_open=False)
    _at_least("sampler.temperature", cfg.sampler.temperature, 0.0)
    _positive("sampler.prior_std", cfg.sampler.prior_std)

    _choice("sampler.schedule", cfg.sampler.schedule, SCHEDULES)
    _at_least("sampler.cycle_epochs", cfg.sampler.cycle_epochs, 1)
    _in_range("sampler.exploration_fraction", cfg.sampler.exploration_fraction, 0.0, 1.0, low_open=False)
    _check_sampling_phase(cfg.sampler)
    _in_range("sampler.psgld_decay", cfg.sampler.psgld_decay, 0.0, 1.0, low_open=False)
    _positive("sampler.psgld_epsilon", cfg.sampler.psgld_epsilon)

    _at_least("training.num_epochs", cfg.training.num_epochs, 1)
    _at_least("training.seed", cfg.training.seed, 0)
    _at_least("training.validate_every_epochs", cfg.training.validate_every_epochs, 0)
    if cfg.data.val_fraction == 0 and cfg.training.validate_every_epochs > 0:
        raise ConfigError(
            f"data.val_fraction=0 leaves no validation examples, but "
            f"training.validate_every_epochs={cfg.training.validate_every_epochs} asks for "
            f"validation; set training.validate_every_epochs=0 or a positive data.val_fraction"
        )
    _at_least("samples.start_epoch", cfg.samples.start_epoch, 1)
    _at_least("samples.every_epochs", cfg.samples.every_epochs, 1)
    if cfg.samples.start_epoch > cfg.training.num_epochs:
        raise ConfigError(
            f"samples.start_epoch={cfg.samples.start_epoch} is after the last epoch "
            f"(training.num_epochs={cfg.training.num_epochs}), so no posterior sample would be "
            f"written; allowed: 1 <= samples.start_epoch <= training.num_epochs"
        )
    if first_sample_epoch(cfg) is None:
        raise ConfigError(
            f"no epoch from samples.start_epoch={cfg.samples.start_epoch} to "
            f"training.num_epochs={cfg.training.num_epochs} in steps of "
            f"samples.every_epochs={cfg.samples.every_epochs} lies wholly in a sampling phase of "
            f"the cyclical schedule (the last {_sampling_epochs_per_cycle(cfg.sampler)} of every "
            f"sampler.cycle_epochs={cfg.sampler.cycle_epochs} epochs), so no posterior sample would "
            f"be written; raise training.num_epochs or change samples.start_epoch or "
            f"samples.every_epochs"
        )
    _at_least("checkpoint.every_epochs", cfg.checkpoint.every_epochs, 1)
    if cfg.checkpoint.keep_last is not None:
        _at_least("checkpoint.keep_last", cfg.checkpoint.keep_last, 1)
    _at_least("checkpoint.keep_best", cfg.checkpoint.keep_best, 0)
    _choice("checkpoint.best_metric", cfg.checkpoint.best_metric, BEST_METRICS)
    _choice("checkpoint.best_mode", cfg.checkpoint.best_mode, BEST_MODES)
    task = task_of(cfg.data.name)
    for other_task, metric in _TASK_METRICS.items():
        if cfg.checkpoint.best_metric == metric and other_task != task:
            raise ConfigError(
                f"checkpoint.best_metric={metric} exists for {other_task} data sets only, but "
                f"data.name={cfg.data.name} is a {task} data set; use {_TASK_METRICS[task]}, "
                f"val/nll or train/loss"
            )
    catchable = sorted(s.name for s in signal.Signals if s not in (signal.SIGKILL, signal.SIGSTOP))
    for i, name in enumerate(cfg.checkpoint.preempt_signals):
        _choice(f"checkpoint.preempt_signals[{i}]", name, catchable)
    if cfg.checkpoint.keep_best and cfg.checkpoint.keep_last is None:
        raise ConfigError(
            f"checkpoint.keep_best={cfg.checkpoint.keep_best} has no effect while "
            f"checkpoint.keep_last=null keeps every checkpoint; set checkpoint.keep_last too"
        )
    if (
        cfg.checkpoint.keep_best
        and cfg.checkpoint.best_metric.startswith("val/")
        and cfg.training.validate_every_epochs == 0
    ):
        raise ConfigError(
            f"checkpoint.best_metric={cfg.checkpoint.best_metric} needs validation, but "
            f"training.validate_every_epochs=0 disables it; enable validation or use train/loss"
        )
    if not cfg.wandb.project.strip():
        raise ConfigError("wandb.project is empty; set a project name, e.g. wandb.project=dist-bnn")


def _check_sampling_phase(sampler: SamplerConfig) -> None:
    if sampler.schedule == "cyclical" and _sampling_epochs_per_cycle(sampler) == 0:
        raise ConfigError(
            f"sampler.exploration_fraction={sampler.exploration_fraction!r} with "
            f"sampler.cycle_epochs={sampler.cycle_epochs} leaves no epoch wholly in the sampling "
            f"phase, so no posterior sample would be written; allowed: "
            f"sampler.exploration_fraction <= (cycle_epochs - 1) / cycle_epochs = "
            f"{(sampler.cycle_epochs - 1) / sampler.cycle_epochs:g}, or raise sampler.cycle_epochs"
        )


def task_of(dataset: str) -> str:
    """Return ``classification`` or ``regression`` for a value of ``data.name``."""
    return "classification" if dataset in CLASSIFICATION_DATASETS else "regression"


def _validate_data_source(data: DataConfig) -> None:
    """Check the keys that locate a UCI-format directory; whether its files exist is checked
    when the data is loaded."""
    _at_least("data.split", data.split, 0)
    if data.name == "uci" and not (data.root or "").strip():
        raise ConfigError(
            "data.name=uci needs data.root, the directory that contains data.txt and the "
            "index_*.txt files; set it, e.g. data.root=data/uci/concrete"
        )


def _validate_likelihood(likelihood: LikelihoodConfig) -> None:
    _choice("likelihood.noise", likelihood.noise, NOISE_MODES)
    if likelihood.noise_std is not None:
        _positive("likelihood.noise_std", likelihood.noise_std)
    elif likelihood.noise == "fixed":
        raise ConfigError(
            "likelihood.noise=fixed needs likelihood.noise_std, the noise standard deviation in "
            "the target's units; set it, e.g. likelihood.noise_std=0.5, or use "
            "likelihood.noise=inferred"
        )
    _positive("likelihood.log_noise_prior_std", likelihood.log_noise_prior_std)


def _choice(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not supported; allowed: {', '.join(allowed)}")


def _at_least(key: str, value: float, minimum: float) -> None:
    # Written as "not >=" so that NaN is rejected too.
    if not value >= minimum or math.isinf(value):
        finite = "finite " if isinstance(value, float) else ""
        raise ConfigError(f"{key}={value!r} is invalid; allowed: {finite}{key} >= {minimum:g}")


def _positive(key: str, value: float) -> None:
    if not value > 0 or math.isinf(value):
        raise ConfigError(f"{key}={value!r} is invalid; allowed: finite {key} > 0")


def _in_range(key: str, value: float, low: float, high: float, low_open: bool) -> None:
    ok = (value > low if low_open else value >= low) and value < high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{key}={value!r} is invalid; allowed: {bracket}{low:g}, {high:g})")


# ---------------------------------------------------------------------------------------------
# Sample epochs


def is_sample_epoch(cfg: Config, epoch: int) -> bool:
    """Return whether the weights at the end of ``epoch`` (1-based) are a posterior sample.

    The rule: ``epoch >= samples.start_epoch``, ``epoch - samples.start_epoch`` is a multiple of
    ``samples.every_epochs``, and, with ``sampler.schedule=cyclical``, the whole epoch lies in
    the sampling phase of its cycle, so none of its steps ran without noise.
    """
    samples = cfg.samples
    if epoch < samples.start_epoch or (epoch - samples.start_epoch) % samples.every_epochs:
        return False
    return in_sampling_phase(cfg.sampler, epoch)


def in_sampling_phase(sampler: SamplerConfig, epoch: int) -> bool:
    """Return whether every step of ``epoch`` (1-based) runs with noise under ``sampler``.

    Always true for the constant schedule. Under the cyclical one, epoch ``e`` starts at the
    cycle phase ``((e - 1) mod cycle_epochs) / cycle_epochs``, and the noise of a step is on
    once its phase reaches ``exploration_fraction``. The phase only grows within a cycle, so an
    epoch that starts in the sampling phase stays in it.
    """
    if sampler.schedule == "constant":
        return True
    return ((epoch - 1) % sampler.cycle_epochs) / sampler.cycle_epochs >= sampler.exploration_fraction


def first_sample_epoch(cfg: Config) -> int | None:
    """Return the first epoch that :func:`is_sample_epoch` accepts, or ``None`` if no epoch up
    to ``training.num_epochs`` is accepted."""
    start, every = cfg.samples.start_epoch, cfg.samples.every_epochs
    # The rule repeats with period lcm(every_epochs, cycle_epochs), so one period decides.
    last = min(cfg.training.num_epochs, start + math.lcm(every, cfg.sampler.cycle_epochs) - 1)
    return next((epoch for epoch in range(start, last + 1, every) if is_sample_epoch(cfg, epoch)), None)


def _sampling_epochs_per_cycle(sampler: SamplerConfig) -> int:
    return sum(in_sampling_phase(sampler, epoch) for epoch in range(1, sampler.cycle_epochs + 1))


# ---------------------------------------------------------------------------------------------
# Serialisation


def to_dict(cfg: Config) -> dict[str, Any]:
    """Return the config as plain JSON-compatible nested dicts."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a validated config from :func:`to_dict` output (for example a manifest's copy)."""
    _check_keys(data, Config, prefix="", source="stored config")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), data))
    assert isinstance(cfg, Config)
    validate(cfg)
    return cfg


def config_hash(cfg: Config) -> str:
    """Return the sha256 of the canonical JSON of the whole config."""
    return _sha256_json(to_dict(cfg))


def trajectory_values(cfg: Config) -> dict[str, Any]:
    """Return the flattened values of :data:`TRAJECTORY_KEYS`, keyed by dotted name."""
    flat = _flatten(to_dict(cfg))
    return {
        key: value
        for key, value in flat.items()
        if any(key == t or key.startswith(t + ".") for t in TRAJECTORY_KEYS)
    }


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
