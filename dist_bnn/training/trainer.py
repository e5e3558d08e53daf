"""The training job: builds the Ignite engine on every rank, restores a checkpoint, runs.

Every rank runs :func:`run_on_rank` inside ``idist.Parallel``. Rank 0 alone inspects and
prepares the run directory and broadcasts the outcome as JSON, so every rank takes the same
branch afterwards: all collectives are entered by all ranks or by none.
"""

from __future__ import annotations

import copy
import datetime
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ignite
import ignite.distributed as idist
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar

import dist_bnn
from dist_bnn import distributed
from dist_bnn.checkpoint import manager
from dist_bnn.checkpoint.manifest import Manifest
from dist_bnn.checkpoint.replicas import check_replicas
from dist_bnn.checkpoint.rng import derive_seed, restore_rng_state, seed_rank_rngs
from dist_bnn.config import Config, config_hash, to_dict
from dist_bnn.data import attach_sampler_epoch, build_eval_loader, build_train_loader, load_splits
from dist_bnn.errors import ResumeError
from dist_bnn.evaluation.bma import evaluate_bma, evaluate_weights
from dist_bnn.logs import setup_logging
from dist_bnn.models import MLP
from dist_bnn.samplers import build_sampler
from dist_bnn.training.run_dir import RunPlan, plan_run
from dist_bnn.training.samples import SampleStore, unwrap
from dist_bnn.training.tracking import Tracker

logger = logging.getLogger(__name__)

# Independent RNG streams derived from training.seed (see checkpoint.rng.derive_seed).
_MODEL_INIT_STREAM = 0
_NOISE_STREAM = 1


def train(cfg: Config, log_level: str = "INFO") -> None:
    """Run (or resume) the training job described by ``cfg`` on every rank of this launch."""
    backend = distributed.resolve_backend(cfg.distributed.backend)
    parallel = idist.Parallel(backend=backend)
    # Ignite's launcher logs its own start and end at INFO; the run's own lines replace them.
    logging.getLogger("ignite.distributed.launcher.Parallel").setLevel(logging.WARNING)
    with parallel:
        parallel.run(run_on_rank, cfg, log_level)


def run_on_rank(local_rank: int, cfg: Config, log_level: str) -> None:
    """Train on this rank. Every rank must call this (``idist.Parallel.run`` does)."""
    rank, world_size = distributed.rank(), distributed.world_size()
    setup_logging(rank, world_size, log_level)
    run_dir = Path(cfg.run.dir)
    logger.info(
        "run %s: world size %d, backend %s, device %s",
        run_dir,
        world_size,
        idist.backend() or "none (single process)",
        idist.device(),
    )

    plan = RunPlan.from_json(distributed.broadcast_json(
        plan_run(run_dir, cfg, world_size).to_json() if distributed.is_writer() else None
    ))
    if plan.error is not None:
        raise ResumeError(plan.error)
    if plan.complete:
        _report_complete(run_dir, plan)
        return

    job = _build_job(cfg, run_dir, plan)
    try:
        job.engine.run(job.train_loader, max_epochs=cfg.training.num_epochs)
    finally:
        job.tracker.finish()
    # Leave together: a rank that tears down its gloo group while rank 0 still closes W&B was
    # seen to abort ("terminate called without an active exception") on torch 2.13.
    distributed.barrier()


def _report_complete(run_dir: Path, plan: RunPlan) -> None:
    manifest = plan.resume_manifest
    assert manifest is not None
    logger.info(
        "run complete: %s already contains epoch %d of %d (checkpoint %s); nothing to train. "
        "Raise training.num_epochs to continue the chain.",
        run_dir,
        manifest.epoch,
        manifest.num_epochs,
        plan.resume_path,
    )
    if manifest.final_metrics:
        logger.info("test metrics of the Bayesian model average: %s", _format(manifest.final_metrics))
    else:
        logger.warning(
            "checkpoint %s was written before the last epoch of a longer run, so it contains no "
            "test metrics of the Bayesian model average",
            plan.resume_path,
        )


@dataclass
class _Job:
    engine: Engine
    train_loader: torch.utils.data.DataLoader
    tracker: Tracker


def _build_job(cfg: Config, run_dir: Path, plan: RunPlan) -> _Job:
    rank, world_size = distributed.rank(), distributed.world_size()
    device = idist.device()
    seed = cfg.training.seed

    # Data: the split and every epoch's order depend on the seed only, never on the rank count
    # of a previous launch.
    splits = load_splits(cfg.data, seed)
    train_loader = build_train_loader(
        splits.train, cfg.data.batch_size, world_size, rank, cfg.data.shuffle, seed
    )
    val_loader = build_eval_loader(splits.val, cfg.data.eval_batch_size, world_size, rank)
    test_loader = build_eval_loader(splits.test, cfg.data.eval_batch_size, world_size, rank)

    # Model and sampler: the same initial weights and the same noise seed on every rank.
    torch.manual_seed(derive_seed(seed, _MODEL_INIT_STREAM))
    model = idist.auto_model(
        MLP(splits.num_features, cfg.model.hidden_sizes, splits.num_classes, cfg.model.activation)
    )
    optimizer = build_sampler(
        cfg.sampler, model.parameters(), num_data=len(splits.train),
        noise_seed=derive_seed(seed, _NOISE_STREAM),
    )

    samples = SampleStore(run_dir, cfg.samples.start_epoch, cfg.samples.every_epochs)
    tracker = Tracker(run_dir, cfg.wandb, plan.run_id, to_dict(cfg))
    engine = _build_engine(model, optimizer, device)
    attach_sampler_epoch(engine, train_loader)

    # Restore, or start fresh. RNG states are set last, after everything that draws from them.
    if plan.resume_manifest is not None:
        rng_state = _restore(engine, model, optimizer, samples, train_loader, plan, cfg)
        restore_rng_state(rng_state)
        resumed_epoch = plan.resume_manifest.epoch
    else:
        if distributed.is_writer():
            samples.remove_uncommitted(after_epoch=0)
        seed_rank_rngs(seed, rank)
        resumed_epoch = 0
    tracker.start(resumed_epoch)

    def end_of_epoch(engine: Engine) -> None:
        _end_of_epoch(engine, cfg, run_dir, plan, model, optimizer, samples, tracker, val_loader, test_loader, device)

    engine.add_event_handler(Events.EPOCH_COMPLETED, end_of_epoch)
    if distributed.is_writer():
        ProgressBar(persist=True).attach(engine)
    return _Job(engine, train_loader, tracker)


def _build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> Engine:
    def step(engine: Engine, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        model.train()
        features, targets = batch[0].to(device), batch[1].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(features), targets)
        # DDP averages the gradients over ranks inside backward(), so step() below receives
        # the gradient of the mean loss over the global batch and draws the shared noise after it.
        loss.backward()
        optimizer.step()
        # Accumulated on the device and read once per epoch: no host sync per iteration.
        engine.state.loss_sum += loss.detach()

    engine = Engine(step)

    @engine.on(Events.EPOCH_STARTED)
    def _reset_loss(engine: Engine) -> None:
        engine.state.loss_sum = torch.zeros((), device=device)

    return engine


def _restore(engine, model, optimizer, samples, train_loader, plan: RunPlan, cfg: Config) -> dict[str, Any]:
    manifest = plan.resume_manifest
    assert manifest is not None and plan.resume_path is not None
    if manifest.epoch_length != len(train_loader):
        raise ResumeError(
            f"checkpoint {plan.resume_path} has {manifest.epoch_length} iterations per epoch but "
            f"this launch has {len(train_loader)}; resume with the same data.batch_size and "
            f"world size as the run that wrote it"
        )
    rng_state = manager.load_checkpoint(Path(plan.resume_path), model, optimizer)
    samples.restore(manifest.sample_files, manifest.samples, manifest.epoch)
    engine.load_state_dict(
        {
            "iteration": manifest.iteration,
            "epoch_length": manifest.epoch_length,
            "max_epochs": cfg.training.num_epochs,
        }
    )
    _check_identical_state(engine)
    logger.info(
        "resumed from %s: epoch=%d iteration=%d world_size=%d (identical on all %d ranks)",
        plan.resume_path,
        engine.state.epoch,
        engine.state.iteration,
        distributed.world_size(),
        distributed.world_size(),
    )
    return rng_state


def _check_identical_state(engine: Engine) -> None:
    """Raise unless every rank restored the same trainer.state. Every rank must call this."""
    local = [engine.state.epoch, engine.state.iteration, engine.state.epoch_length]
    states = distributed.all_gather_ints(local)
    if any(state != states[0] for state in states):
        raise RuntimeError(f"ranks restored different trainer states (epoch, iteration, epoch_length): {states}")


def _end_of_epoch(
    engine: Engine, cfg: Config, run_dir: Path, plan: RunPlan, model, optimizer,
    samples: SampleStore, tracker: Tracker, val_loader, test_loader, device: torch.device,
) -> None:
    """Per-epoch bookkeeping, in an order that keeps every record consistent after a kill.

    Metrics, then the sample file, then the checkpoint that commits both, then W&B.
    """
    epoch, iteration = engine.state.epoch, engine.state.iteration
    num_epochs = cfg.training.num_epochs
    world_size = distributed.world_size()

    # 1. Metrics. Training loss: mean over all ranks' batches of this epoch.
    loss_sum = distributed.all_reduce_sum(engine.state.loss_sum.double()).item()
    row: dict[str, Any] = {
        "epoch": epoch,
        "iteration": iteration,
        "train/loss": loss_sum / (engine.state.epoch_length * world_size),
    }
    every = cfg.training.validate_every_epochs
    if every and epoch % every == 0:
        val = evaluate_weights(unwrap(model), val_loader, device)
        row.update({"val/accuracy": val["accuracy"], "val/nll": val["nll"]})
    tracker.record_epoch(row)
    logger.debug("epoch %d: %s", epoch, _format(row))

    # 2. Posterior sample, named by the true epoch.
    if samples.is_due(epoch):
        samples.write(epoch, model)

    # 3. Test metrics of the Bayesian model average after the last epoch, stored in its manifest.
    final_metrics = None
    if epoch == num_epochs:
        distributed.barrier()  # rank 0 has written the last sample file
        bma = evaluate_bma(copy.deepcopy(unwrap(model)), samples.paths(), test_loader, device)
        final_metrics = {f"test/{k}": v for k, v in bma.items()}
        logger.info("test metrics of the Bayesian model average: %s", _format(final_metrics))

    # 4. Checkpoint, committing the sample list; then W&B, which must never see an epoch twice.
    if epoch % cfg.checkpoint.every_epochs == 0 or epoch == num_epochs:
        check_replicas(model)
        manifest = Manifest(
            epoch=epoch,
            iteration=iteration,
            epoch_length=engine.state.epoch_length,
            num_epochs=num_epochs,
            world_size=world_size,
            sample_files=list(samples.files),
            files={},  # filled in by save_checkpoint with the digests of what it wrote
            samples=samples.committed_digests() if distributed.is_writer() else {},
            wandb_run_id=plan.run_id,
            config_hash=config_hash(cfg),
            config=to_dict(cfg),
            versions={"torch": torch.__version__, "pytorch-ignite": ignite.__version__, "dist_bnn": dist_bnn.__version__},
            metrics={k: v for k, v in row.items() if k not in ("epoch", "iteration")},
            final_metrics=final_metrics,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        manager.save_checkpoint(run_dir, model, optimizer, manifest)
        tracker.flush()
        if distributed.is_writer():
            manager.apply_retention(
                run_dir,
                keep_last=cfg.checkpoint.keep_last,
                keep_best=cfg.checkpoint.keep_best,
                best_metric=cfg.checkpoint.best_metric,
                best_mode=cfg.checkpoint.best_mode,
                protect={Path(plan.resume_path)} if plan.resume_path else set(),
            )
    if final_metrics is not None:
        tracker.summary(final_metrics)


def _format(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
