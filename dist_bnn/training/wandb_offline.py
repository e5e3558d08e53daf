"""Reading the history rows that W&B offline runs stored on disk.

wandb-core buffers records and writes ``run-<id>.wandb`` in blocks, so a launch killed with
SIGKILL can leave its file with none of the rows it logged. On resume the tracker reads what
earlier launches of the run really stored and logs the missing rows again.

The file is a 7-byte header (``:W&B``, a 2-byte magic, a version byte) followed by the LevelDB
log format: 32 KiB blocks of chunks, each with a 7-byte header (crc32, little-endian length,
type) carrying serialized ``wandb_internal_pb2.Record`` messages. wandb 0.31 ships no Python
reader for it.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

logger = logging.getLogger(__name__)

_FILE_HEADER_SIZE = 7
_CHUNK_HEADER_SIZE = 7
_BLOCK_SIZE = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[Any]:
    """Return the complete records of one ``.wandb`` file; a record cut short by a kill ends
    the list."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (no :W&B header)")
    records: list[Any] = []
    pending = b""
    offset = _FILE_HEADER_SIZE
    while offset + _CHUNK_HEADER_SIZE <= len(data):
        left_in_block = _BLOCK_SIZE - offset % _BLOCK_SIZE
        if left_in_block < _CHUNK_HEADER_SIZE:
            offset += left_in_block  # block trailer padding
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + _CHUNK_HEADER_SIZE])
        start = offset + _CHUNK_HEADER_SIZE
        if kind == 0 or start + length > len(data):
            break  # zero padding or a chunk cut short by a kill
        chunk = data[start : start + length]
        offset = start + length
        if kind in (_FULL, _FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (_FIRST, _MIDDLE):
            continue
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(pending)
        except DecodeError:
            break
        records.append(record)
        pending = b""
    return records


def history_rows(offline_run: Path) -> list[dict[str, Any]]:
    """Return the history rows stored in one offline run directory, in logged order."""
    rows = []
    for path in sorted(offline_run.glob("run-*.wandb")):
        for record in read_records(path):
            if record.WhichOneof("record_type") != "history":
                continue
            row: dict[str, Any] = {"_step": record.history.step.num}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def offline_runs(wandb_dir: Path, run_id: str | None = None) -> list[Path]:
    """Return the offline run directories under ``wandb_dir`` (optionally of one run id),
    oldest first."""
    pattern = f"offline-run-*-{run_id}" if run_id else "offline-run-*"
    return sorted(wandb_dir.glob(pattern))


def run_id_of(offline_run: Path) -> str:
    return offline_run.name.rsplit("-", 1)[1]


def stored_steps(wandb_dir: Path, run_id: str) -> set[int]:
    """Return the W&B steps that earlier offline launches of ``run_id`` stored on disk."""
    return {row["_step"] for run in offline_runs(wandb_dir, run_id) for row in history_rows(run)}
