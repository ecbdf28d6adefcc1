"""The attack lab end to end: real nodes, two cheap scenarios, behaviour only (no timing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_attack_lab_quick_keeps_nodes_alive_and_counts_refusals(tmp_path: Path) -> None:
    out = tmp_path / "lab"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "attack_lab.py"),
            "--quick",
            "--scenarios",
            "connect-flood,plain-client",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,  # a ceiling, not an expectation: the quick run takes a few minutes on 2 cores
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {r["scenario"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(results) == {"connect-flood", "plain-client"}
    for name, r in results.items():
        assert r["error"] == "", (name, r["error"])
        assert r["alive"].startswith("3/3"), (name, r["alive"], r["notes"])
    # every anonymous client was refused, and each refusal was counted with a reason
    plain = results["plain-client"]
    assert sum(plain["refused"].values()) > 0, plain
    assert not any("rc 0" in note for note in plain["notes"]), plain["notes"]
    table = (out / "attack_lab.md").read_text()
    assert "| connect-flood |" in table and "| plain-client |" in table
    assert (out / "attack_lab.csv").read_text().count("\n") == 3
