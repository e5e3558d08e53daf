"""The training job: builds the Ignite engine on every rank, restores a checkpoint, runs.

Every rank runs :func:`run_on_rank` in the process group that :func:`train` creates. Rank 0 alone inspects and
prepares the run directory and broadcasts the outcome as JSON, so every rank takes the same
branch afterwards: all collectives are entered by all ranks or by none.
"""

from __future__ import annotations

import copy
import datetime
import gc
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import ignite
import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from torch.distributed.checkpoint.state_dict import get_state_dict

import dist_bnn
from dist_bnn import distributed
from dist_bnn.checkpoint import manager
from dist_bnn.checkpoint.manifest import Manifest
from dist_bnn.checkpoint.replicas import check_replicas, tree_fingerprint
from dist_bnn.checkpoint.rng import capture_rng_state, derive_seed, restore_rng_state, seed_rank_rngs
from dist_bnn.config import Config, config_hash, is_sample_epoch, to_dict
from dist_bnn.data import attach_sampler_epoch, build_eval_loader, build_train_loader, load_splits
from dist_bnn.errors import ResumeError
from dist_bnn.evaluation.bma import evaluate_bma, evaluate_weights
from dist_bnn.logs import setup_logging
from dist_bnn.likelihoods import build_likelihood
from dist_bnn.models import build_model
from dist_bnn.samplers import build_sampler
from dist_bnn.samplers.schedules import apply_step_settings, step_settings
from dist_bnn.training.preemption import Preempted, PreemptionFlag
from dist_bnn.training.run_dir import RunPlan, plan_run, write_identity
from dist_bnn.training.samples import SampleStore, unwrap
from dist_bnn.training.tracking import Tracker

logger = logging.getLogger(__name__)

# Independent RNG streams derived from training.seed (see checkpoint.rng.derive_seed).
_MODEL_INIT_STREAM = 0
_NOISE_STREAM = 1


def train(cfg: Config, log_level: str = "INFO") -> None:
    """Run (or resume) the training job described by ``cfg`` on every rank of this launch."""
    backend = distributed.resolve_backend(cfg.distributed.backend)
    if backend is None:
        run_on_rank(0, cfg, log_level)
        return
    # Under a launcher idist.Parallel passes no timeout to the process group, so the group is
    # created here. ignite.distributed then works from it as usual.
    idist.initialize(backend, timeout=datetime.timedelta(seconds=cfg.distributed.timeout_s))
    try:
        run_on_rank(idist.get_local_rank(), cfg, log_level)
    except BaseException as err:
        # The failed frames' locals (the job, its DDP model) must go before the group does.
        traceback.clear_frames(err.__traceback__)
        raise
    finally:
        _release_group_users()
        idist.finalize()


def _release_group_users() -> None:
    """Free the objects that still hold the process group, such as the DDP model's reducer,
    while the group exists.

    The engine's handlers and the job refer to each other, so only the cycle collector frees
    them. A DDP model still alive at interpreter exit, after the group was destroyed, aborted
    one rank ("terminate called without an active exception", exit code -6) in about one
    2-rank launch in five on torch 2.13 with gloo.
    """
    gc.collect()


def run_on_rank(local_rank: int, cfg: Config, log_level: str) -> None:
    """Train on this rank. Every rank must call this (:func:`train` does).

    Raises:
        ResumeError: on every rank, if the run directory cannot be resumed as asked.
        Preempted: on every rank, after a preemption signal and the checkpoint it asked for.
    """
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
        manifest = plan.resume_manifest
        Tracker(run_dir, cfg.wandb, plan.run_id, to_dict(cfg)).repair_finished(manifest.epoch, manifest.final_metrics)
        return

    job = TrainingJob(cfg, run_dir, plan)
    job.preemption.install()
    try:
        job.engine.run(job.train_loader, max_epochs=cfg.training.num_epochs)
    finally:
        job.preemption.uninstall()
        job.tracker.finish()
    # Leave together: a rank that tears down its gloo group while rank 0 still closes W&B was
    # seen to abort ("terminate called without an active exception") on torch 2.13.
    distributed.barrier()
    if job.preempted_checkpoint is not None:
        raise Preempted(
            f"stopped after {job.preemption.received or 'a preemption signal to another rank'} "
            f"at iteration {job.iteration}; "
            f"checkpoint {job.preempted_checkpoint} is committed. Relaunch the same command to "
            f"resume from it"
        )


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


class TrainingJob:
    """The engine, model, sampler and run records of one launch. Build on every rank.

    Construction restores the newest checkpoint when the plan names one; RNG states are set
    last, after everything that draws from them.
    """

    def __init__(self, cfg: Config, run_dir: Path, plan: RunPlan) -> None:
        self.cfg, self.run_dir, self.plan = cfg, run_dir, plan
        self.device = idist.device()
        self.preempted_checkpoint: Path | None = None
        self._build_data()
        self._build_model()
        self.samples = SampleStore(run_dir)
        self.tracker = Tracker(run_dir, cfg.wandb, plan.run_id, to_dict(cfg))
        self.engine = self._build_engine()
        self.async_checkpointer = manager.AsyncCheckpointer() if cfg.checkpoint.async_save else None
        self.iteration_offset = 0
        self.preemption = PreemptionFlag(cfg.checkpoint.preempt_signals, lambda: self.iteration)
        self.preemption.attach(self.model)
        self._stop_after_epoch = False
        # Everything above may reject the request (a batch size that does not fit, say); only
        # now does a new run leave its first file.
        if plan.new_run and distributed.is_writer():
            write_identity(run_dir, cfg, plan.run_id)

        if plan.resume_manifest is not None:
            restore_rng_state(self._restore())
            resumed_epoch = plan.resume_manifest.epoch
        else:
            if distributed.is_writer():
                self.samples.remove_uncommitted(after_epoch=0)
            seed_rank_rngs(cfg.training.seed, distributed.rank())
            resumed_epoch = 0
        self.tracker.start(resumed_epoch)

        self.engine.add_event_handler(Events.ITERATION_STARTED, self._set_step_settings)
        self.engine.add_event_handler(Events.ITERATION_COMPLETED, self._check_preemption)
        self._first_step_logged = False
        self.engine.add_event_handler(Events.ITERATION_COMPLETED, self._log_first_step)
        self.engine.add_event_handler(Events.EPOCH_COMPLETED, self._end_of_epoch)
        if distributed.is_writer() and sys.stderr.isatty():
            # In a log file the bar would redraw every iteration; the per-epoch log line is
            # the progress record there.
            ProgressBar(persist=True).attach(self.engine)

    # -----------------------------------------------------------------------------------------
    # Construction

    def _build_data(self) -> None:
        # The split and every epoch's order depend on the seed only, not on the rank count of
        # a previous launch.
        cfg, rank, world_size = self.cfg, distributed.rank(), distributed.world_size()
        self.splits = load_splits(cfg.data, cfg.training.seed)
        self.likelihood = build_likelihood(cfg, self.splits)
        self.train_loader = build_train_loader(
            self.splits.train, cfg.data.batch_size, world_size, rank, cfg.data.shuffle, cfg.training.seed
        )
        self.val_loader = build_eval_loader(self.splits.val, cfg.data.eval_batch_size, world_size, rank)
        self.test_loader = build_eval_loader(self.splits.test, cfg.data.eval_batch_size, world_size, rank)

    def _build_model(self) -> None:
        # The same initial weights and the same noise seed on every rank.
        cfg, splits = self.cfg, self.splits
        torch.manual_seed(derive_seed(cfg.training.seed, _MODEL_INIT_STREAM))
        self.model = idist.auto_model(build_model(cfg, splits))
        self.optimizer = build_sampler(
            cfg.sampler, self.model.parameters(), num_data=len(splits.train),
            noise_seed=derive_seed(cfg.training.seed, _NOISE_STREAM),
        )

    def _build_engine(self) -> Engine:
        model, optimizer, device, likelihood = self.model, self.optimizer, self.device, self.likelihood

        def step(engine: Engine, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
            model.train()
            features, targets = batch[0].to(device), batch[1].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = likelihood.loss(model(features), targets)
            # DDP averages the gradients over ranks inside backward(), so step() below receives
            # the gradient of the mean loss over the global batch and draws the shared noise
            # after it.
            loss.backward()
            optimizer.step()
            # Accumulated on the device and read once per epoch: no host sync per iteration.
            engine.state.loss_sum += loss.detach()

        engine = Engine(step)
        attach_sampler_epoch(engine, self.train_loader)
        self._restored_loss_sum: torch.Tensor | None = None

        @engine.on(Events.EPOCH_STARTED)
        def _reset_loss(engine: Engine) -> None:
            # A resume inside an epoch continues the sum of the batches done before the stop.
            restored, self._restored_loss_sum = self._restored_loss_sum, None
            engine.state.loss_sum = torch.zeros((), device=device) if restored is None else restored

        return engine

    def _restore(self) -> dict[str, Any]:
        """Load the planned checkpoint and set trainer.state; return this rank's RNG states.
        Every rank must call this."""
        manifest, path = self.plan.resume_manifest, Path(str(self.plan.resume_path))
        assert manifest is not None
        same_world = manifest.world_size == distributed.world_size()
        if same_world and manifest.epoch_length != len(self.train_loader):
            raise ResumeError(
                f"checkpoint {path} has {manifest.epoch_length} iterations per epoch but this "
                f"launch has {len(self.train_loader)}; resume with the same data.batch_size as "
                f"the run that wrote it"
            )
        rng_state = manager.load_checkpoint(path, self.model, self.optimizer, load_rng=same_world)
        self.samples.restore(manifest.sample_files, manifest.samples, manifest.epoch)
        if same_world:
            self.iteration_offset = manifest.iteration_offset
            self.engine.load_state_dict(
                {
                    "iteration": manifest.engine_iteration,
                    "epoch_length": manifest.epoch_length,
                    "max_epochs": self.cfg.training.num_epochs,
                }
            )
        else:
            rng_state = self._restore_on_new_world_size(manifest, path)
        _check_identical_state(self.engine)
        logger.debug(
            "restored state fingerprint %016x",
            tree_fingerprint(dict(zip(("model", "optim"), get_state_dict(self.model, self.optimizer)))),
        )

        consumed = manifest.engine_iteration - manifest.epoch * manifest.epoch_length
        if consumed:
            # Inside an epoch: skip the batches already trained, keep their loss sum.
            self.train_loader.sampler.skip_next(consumed * self.train_loader.batch_size)
            self._restored_loss_sum = rng_state["extra"]["loss_sum"].to(self.device)
        logger.info(
            "resumed from %s: epoch=%d iteration=%d world_size=%d (identical on all %d ranks)%s",
            path,
            self.engine.state.epoch,
            self.iteration,
            distributed.world_size(),
            distributed.world_size(),
            f"; continuing epoch {manifest.epoch + 1} at batch {consumed + 1}" if consumed else "",
        )
        return rng_state

    def _restore_on_new_world_size(self, manifest: Manifest, path: Path) -> dict[str, Any]:
        """Set trainer.state for a checkpoint written at another world size; return new RNG
        states derived from (seed, rank, epoch).

        Rule: the run continues at the next epoch boundary with the new loader's epoch_length.
        Its iteration count continues from the checkpoint's (``iteration_offset`` bridges the
        two epoch lengths), so W&B steps never go back.
        """
        # plan_run rejects a checkpoint inside an epoch on another world size.
        assert manifest.at_epoch_end
        epoch_length = len(self.train_loader)
        self.engine.load_state_dict(
            {"epoch": manifest.epoch, "epoch_length": epoch_length, "max_epochs": self.cfg.training.num_epochs}
        )
        self.iteration_offset = manifest.iteration - self.engine.state.iteration
        logger.warning(
            "resuming a checkpoint of world size %d on world size %d: model and sampler state "
            "were resharded, per-rank RNG states were derived anew from (seed, rank, epoch) and "
            "epoch_length is %d (was %d), so the run is no longer bitwise equal to one that kept "
            "%d ranks",
            manifest.world_size,
            distributed.world_size(),
            epoch_length,
            manifest.epoch_length,
            manifest.world_size,
        )
        seed_rank_rngs(self.cfg.training.seed, distributed.rank(), epoch=manifest.epoch)
        return capture_rng_state()

    @property
    def iteration(self) -> int:
        """The run's iteration count: Ignite's counter plus :attr:`iteration_offset`."""
        return self.engine.state.iteration + self.iteration_offset

    # -----------------------------------------------------------------------------------------
    # Event handlers

    def _set_step_settings(self, engine: Engine) -> None:
        """Set the step size and noise switch of the coming step from the schedule.

        Ignite has already counted the coming iteration in ``engine.state``. The settings depend
        on the epoch and the batch index only, which a resume restores, so the schedule keeps no
        state of its own.
        """
        state = engine.state
        batch_index = (state.iteration - 1) % state.epoch_length
        settings = step_settings(self.cfg.sampler, state.epoch - 1, batch_index, state.epoch_length)
        apply_step_settings(self.optimizer, settings)

    def _check_preemption(self, engine: Engine) -> None:
        """Stop every rank at this iteration if any rank was signalled. Every rank runs this."""
        if not self.preemption.requested_anywhere(self.device):
            return
        if engine.state.iteration % engine.state.epoch_length == 0:
            self._stop_after_epoch = True  # the epoch's own bookkeeping and checkpoint come first
            return
        self.preempted_checkpoint = self._save(completed_epochs=engine.state.epoch - 1, metrics={}, preempted=True)
        engine.terminate()

    def _log_first_step(self, engine: Engine) -> None:
        # Marks the end of the launch's start-up cost (process group, data, restore) in the log.
        if not self._first_step_logged:
            self._first_step_logged = True
            logger.info("first step of this launch done: iteration %d", self.iteration)

    def _end_of_epoch(self, engine: Engine) -> None:
        """Per-epoch bookkeeping, in an order that keeps every record consistent after a kill.
        Every rank must call this (Ignite does, at EPOCH_COMPLETED).

        Metrics, then the sample file, then the checkpoint that commits both, then W&B.
        """
        cfg, epoch = self.cfg, engine.state.epoch
        num_epochs = cfg.training.num_epochs
        row = self._epoch_metrics(engine)
        self.tracker.record_epoch(row)
        logger.info("epoch %d/%d: %s", epoch, num_epochs, _format(row))

        if is_sample_epoch(cfg, epoch):
            self.samples.write(epoch, self.model)

        final_metrics = None
        if epoch == num_epochs:
            final_metrics = self._evaluate_bma()

        metrics = {k: v for k, v in row.items() if k not in ("epoch", "iteration")}
        if epoch % cfg.checkpoint.every_epochs == 0 or epoch == num_epochs or self._stop_after_epoch:
            saved = self._save(
                completed_epochs=epoch, metrics=metrics, final_metrics=final_metrics,
                preempted=self._stop_after_epoch,
            )
            if self._stop_after_epoch and epoch < num_epochs:
                self.preempted_checkpoint = saved
                engine.terminate()
        if final_metrics is not None:
            self.tracker.summary(final_metrics)

    def _epoch_metrics(self, engine: Engine) -> dict[str, Any]:
        """Return the epoch's row of metrics. Every rank must call this."""
        # Training loss: the mean over all ranks' batches of this epoch.
        loss_sum = distributed.all_reduce_sum(engine.state.loss_sum.double()).item()
        row: dict[str, Any] = {
            "epoch": engine.state.epoch,
            "iteration": self.iteration,
            "train/loss": loss_sum / (engine.state.epoch_length * distributed.world_size()),
        }
        every = self.cfg.training.validate_every_epochs
        if every and engine.state.epoch % every == 0:
            val = evaluate_weights(unwrap(self.model), self.val_loader, self.device, self.likelihood)
            row.update({f"val/{key}": value for key, value in val.items() if key != "count"})
        return row

    def _evaluate_bma(self) -> dict[str, float]:
        """Return the test metrics of the Bayesian model average, stored in the last epoch's
        manifest. Every rank must call this."""
        distributed.barrier()  # rank 0 has written the last sample file
        bma = evaluate_bma(
            copy.deepcopy(unwrap(self.model)), self.samples.paths(), self.test_loader, self.device, self.likelihood
        )
        final_metrics = {f"test/{k}": v for k, v in bma.items()}
        logger.info("test metrics of the Bayesian model average: %s", _format(final_metrics))
        return final_metrics

    def _save(
        self,
        completed_epochs: int,
        metrics: dict[str, float],
        final_metrics: dict[str, float] | None = None,
        preempted: bool = False,
    ) -> Path | None:
        """Checkpoint the current iteration. Every rank must call this.

        A synchronous save commits before it returns, then sends W&B its rows and prunes old
        checkpoints; it returns the committed path. With ``checkpoint.async_save`` the periodic
        saves return ``None`` and commit later (see :meth:`_commit_pending`). The last epoch's
        save and a preemption save stay synchronous, so a finished or stopped run has nothing
        left in flight.
        """
        cfg, state = self.cfg, self.engine.state
        synchronous = self.async_checkpointer is None or preempted or completed_epochs == cfg.training.num_epochs
        self._commit_pending()
        check_replicas(self.model)

        manifest = Manifest(
            epoch=completed_epochs,
            iteration=self.iteration,
            iteration_offset=self.iteration_offset,
            epoch_length=state.epoch_length,
            num_epochs=cfg.training.num_epochs,
            world_size=distributed.world_size(),
            sample_files=list(self.samples.files),
            files={},  # filled in by save_checkpoint with the digests of what it wrote
            samples=self.samples.committed_digests() if distributed.is_writer() else {},
            wandb_run_id=self.plan.run_id,
            config_hash=config_hash(cfg),
            config=to_dict(cfg),
            versions={"torch": torch.__version__, "pytorch-ignite": ignite.__version__, "dist_bnn": dist_bnn.__version__},
            metrics=metrics,
            final_metrics=final_metrics,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        # Kept in its own dtype: continuing a float32 sum in float64 would change the epoch's loss.
        extra = {"loss_sum": state.loss_sum.detach().cpu()}
        if not synchronous:
            assert self.async_checkpointer is not None
            self.async_checkpointer.save(self.run_dir, self.model, self.optimizer, manifest, rank_extra=extra)
            return None
        path = manager.save_checkpoint(self.run_dir, self.model, self.optimizer, manifest, rank_extra=extra)
        self._after_commit(manifest.epoch)
        if preempted:
            logger.warning(
                "preemption: %s arrived at iteration %s; saved checkpoint %s at iteration %d",
                self.preemption.received or "a signal on another rank",
                self.preemption.received_at_iteration,
                path,
                self.iteration,
            )
        return path


    def _commit_pending(self) -> None:
        """Commit the checkpoint written in the background, if one is in flight. Every rank
        must call this."""
        if self.async_checkpointer is None:
            return
        committed = self.async_checkpointer.commit_pending()
        if committed is not None:
            self._after_commit(committed[1].epoch)

    def _after_commit(self, epoch: int) -> None:
        """Send W&B the rows the new checkpoint commits and prune the checkpoints no rule keeps.

        Both wait for the commit: a W&B row sent earlier would be logged twice after a kill, and
        a checkpoint pruned earlier could be the only one left.
        """
        cfg = self.cfg
        self.tracker.flush(up_to_epoch=epoch)
        if distributed.is_writer():
            manager.apply_retention(
                self.run_dir,
                keep_last=cfg.checkpoint.keep_last,
                keep_best=cfg.checkpoint.keep_best,
                best_metric=cfg.checkpoint.best_metric,
                best_mode=cfg.checkpoint.best_mode,
                protect={Path(self.plan.resume_path)} if self.plan.resume_path else set(),
            )


def _check_identical_state(engine: Engine) -> None:
    """Raise unless every rank restored the same trainer.state. Every rank must call this."""
    local = [engine.state.epoch, engine.state.iteration, engine.state.epoch_length]
    states = distributed.all_gather_ints(local)
    if any(state != states[0] for state in states):
        raise RuntimeError(f"ranks restored different trainer states (epoch, iteration, epoch_length): {states}")


def _format(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
