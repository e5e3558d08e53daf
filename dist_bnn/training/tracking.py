"""Per-epoch records: ``RUN_DIR/metrics.jsonl`` and the W&B run (rank 0 only).

W&B receives an epoch's row only after the checkpoint that covers the epoch is committed. A
run killed between two checkpoints is resumed from the older one and trains those epochs again,
so rows sent before the kill would reach W&B twice. ``metrics.jsonl`` is written at
once and truncated back to the checkpoint's epoch on resume.

A kill can also lose rows that were sent: wandb-core buffers its writes, and a SIGKILLed launch
may leave none of its rows on disk. On resume the tracker therefore logs again every committed
row (from ``metrics.jsonl``) that W&B does not contain. In offline mode it reads the earlier
launches' run files. In online mode it trusts the step that the server reports for the run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dist_bnn import distributed
from dist_bnn.config import WandbConfig
from dist_bnn.training.wandb_offline import stored_steps

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class Tracker:
    """Writes epoch rows to ``metrics.jsonl`` and W&B. Build on every rank; only rank 0 acts."""

    def __init__(self, run_dir: Path, cfg: WandbConfig, run_id: str, config: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.run_id = run_id
        self.config = config
        self.metrics_path = run_dir / METRICS_FILE
        self._pending: list[dict[str, Any]] = []
        self._run: Any = None
        # W&B steps that earlier launches already stored. Rows at these steps are not sent
        # again, because a resume from an older checkpoint than the newest trains them again.
        self._stored: set[int] = set()
        self._online_floor = 0

    def start(self, resumed_epoch: int) -> None:
        """Open the W&B run and cut ``metrics.jsonl`` back to ``resumed_epoch`` (0: fresh)."""
        if not distributed.is_writer():
            return
        self._truncate_metrics(resumed_epoch)
        if self.cfg.mode == "disabled":
            return
        import wandb

        wandb_dir = self.run_dir / "wandb"
        stored = stored_steps(wandb_dir, self.run_id) if self.cfg.mode == "offline" else set()
        self._run = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            name=self.cfg.name,
            id=self.run_id,
            resume="allow",
            mode=self.cfg.mode,
            dir=str(self.run_dir),
            config=self.config,
        )
        # Epoch-level charts use the epoch as x axis; the W&B step is the global iteration,
        # which only grows across resumes.
        self._run.define_metric("iteration")
        self._run.define_metric("epoch")
        for prefix in ("train", "val", "test"):
            self._run.define_metric(f"{prefix}/*", step_metric="epoch")
        logger.info("W&B run %s (%s mode) in %s", self.run_id, self.cfg.mode, wandb_dir)
        self._stored = stored
        if self.cfg.mode == "online":
            # The server's next step for a resumed run: rows below it are stored there.
            self._online_floor = int(self._run.step)
        if resumed_epoch > 0:
            self._log_missing()

    def repair_finished(self, final_epoch: int, final_metrics: dict[str, Any] | None) -> None:
        """Log the committed rows that earlier launches of a finished run did not store.

        A launch killed right after its last checkpoint can lose its W&B rows while the run is
        complete, so a relaunch trains nothing. Offline mode only: it reads what is stored on
        disk and opens W&B only when rows are missing. Only rank 0 acts.
        """
        if not distributed.is_writer() or self.cfg.mode != "offline":
            return
        stored = stored_steps(self.run_dir / "wandb", self.run_id)
        if all(row["iteration"] in stored for row in self._read_metrics()):
            return
        self.start(final_epoch)
        if final_metrics:
            self.summary(final_metrics)
        self.finish()

    def _is_stored(self, row: dict[str, Any]) -> bool:
        return row["iteration"] in self._stored or row["iteration"] < self._online_floor

    def _log_missing(self) -> None:
        missing = [row for row in self._read_metrics() if not self._is_stored(row)]
        for row in missing:
            self._run.log(row, step=row["iteration"])
        if missing:
            logger.info(
                "W&B: logged %d committed row(s) again (epochs %d-%d) that earlier launches did "
                "not store",
                len(missing),
                missing[0]["epoch"],
                missing[-1]["epoch"],
            )

    def _read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines()]

    def record_epoch(self, row: dict[str, Any]) -> None:
        """Append an epoch row to ``metrics.jsonl`` now and queue it for W&B."""
        if not distributed.is_writer():
            return
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
        self._pending.append(row)

    def flush(self, up_to_epoch: int) -> None:
        """Send the queued rows of epochs up to ``up_to_epoch`` to W&B; call right after the
        checkpoint of that epoch is committed. Rows of later epochs stay queued: a kill before
        their checkpoint commits makes the resumed run log them again."""
        if not distributed.is_writer():
            return
        ready = [row for row in self._pending if row["epoch"] <= up_to_epoch]
        if self._run is not None:
            for row in ready:
                if not self._is_stored(row):
                    self._run.log(row, step=row["iteration"])
        self._pending = [row for row in self._pending if row["epoch"] > up_to_epoch]

    def summary(self, values: dict[str, Any]) -> None:
        if distributed.is_writer() and self._run is not None:
            self._run.summary.update(values)

    def finish(self) -> None:
        if distributed.is_writer() and self._run is not None:
            self._run.finish()
            self._run = None

    def _truncate_metrics(self, epoch: int) -> None:
        if not self.metrics_path.exists():
            return
        kept, dropped = [], 0
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1  # a line cut short by a kill
                continue
            if row.get("epoch", 0) <= epoch:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            logger.info(
                "dropped %d row(s) after epoch %d from %s (the resumed run writes them again)",
                dropped,
                epoch,
                self.metrics_path,
            )
            self.metrics_path.write_text("".join(line + "\n" for line in kept))
