"""``dist-bnn export``: a 2-rank checkpoint to one plain file, checked against DCP."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import DIGITS_CONFIG, LAUNCH_TIMEOUT_S, SMALL_JOB, load_dcp, make_env, newest_checkpoint, run_ok, train_command
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run_dir = root / "run"
    args = [str(DIGITS_CONFIG), f"run.dir={run_dir}", *SMALL_JOB, "training.num_epochs=1",
            "samples.start_epoch=1", "wandb.mode=disabled"]
    run_ok(train_command(args, nproc=2), make_env(root))
    return newest_checkpoint(run_dir)


def export(checkpoint, out, env):
    return subprocess.run(
        [sys.executable, "-m", "dist_bnn", "export", str(checkpoint), str(out)],
        env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
    )


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_equals_checkpoint(checkpoint, suffix, tmp_path, env):
    out = tmp_path / f"model{suffix}"
    result = export(checkpoint, out, env)
    assert result.returncode == 0, result.stderr
    loaded = load_file(str(out)) if suffix == ".safetensors" else torch.load(out, weights_only=True)
    expected = load_dcp(checkpoint)["model"]
    assert sorted(loaded) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_export_bad_suffix_writes_nothing(checkpoint, tmp_path, env):
    result = export(checkpoint, tmp_path / "model.bin", env)
    assert result.returncode == 2
    assert "use one of .pt, .safetensors" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_export_invalid_checkpoint_fails(checkpoint, tmp_path, env):
    import shutil

    copy = tmp_path / "run" / "checkpoints" / checkpoint.name
    shutil.copytree(checkpoint.parent.parent, tmp_path / "run", dirs_exist_ok=True)
    (copy / "__1_0.distcp").write_bytes(b"")
    out = tmp_path / "model.pt"
    result = export(copy, out, env)
    assert result.returncode == 2
    assert "does not verify" in result.stderr
    assert not out.exists()
