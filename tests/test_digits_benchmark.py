"""benchmarks/digits.py end to end on a few epochs: every job trains and evaluates, and the
tables come out."""

from __future__ import annotations

import json
import sys

from conftest import REPO, make_env, run

# Short runs: cSGHMC cycles of 2 epochs sample at epoch 4; MAP and SGLD sample from epoch 3.
SHORT_RUN = (
    "training.num_epochs=4", "samples.start_epoch=3", "sampler.cycle_epochs=2",
    "sampler.exploration_fraction=0.5", "checkpoint.every_epochs=1", "model.hidden_sizes=[16]",
)
METHOD_CONFIGS = ("digits_map", "digits_sgld", "digits_csghmc")


def test_digits_script_tables(tmp_path):
    command = [
        sys.executable, str(REPO / "benchmarks" / "digits.py"), "--seeds", "0", "1", "--jobs", "2",
        "--out", str(tmp_path / "out"), "--set", *SHORT_RUN,
    ]
    result = run(command, make_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]

    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert any(line.startswith("| MAP (SGHMC at T=0) | 2 |") for line in rows)
    assert any(line.startswith("| cSGHMC | 1 |") for line in rows)
    paired = [line for line in rows if line.startswith("| SGLD |") and line.count("/2") == 2]
    assert len(paired) == 1
    # The shipped configs were tuned on seeds 0 and 1 (and 2), so the script warns.
    assert "were tuned on seeds [0, 1]" in result.stderr

    for config in METHOD_CONFIGS:
        for seed in (0, 1):
            metrics = json.loads((tmp_path / "out" / f"{config}_seed{seed}" / "eval" / "metrics.json").read_text())
            assert 0 <= metrics["accuracy"] <= 1
            assert metrics["nll"] > 0
