"""The README's federation-by-hand recipe, run as a newcomer would: only `p2pfl` commands.

Three hospitals, one CSV each (a sklearn bundled data set written out with text labels and a
patient id column), keys made on each "device", certificates issued by the admin from the public
keys only, `p2pfl config` edited per site, three real `p2pfl node` processes on 127.0.0.1 finding
each other by mDNS, then `p2pfl evaluate` and `p2pfl predict` on the model a node saved.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

pytestmark = pytest.mark.slow

FEATURES = ["mean_radius", "mean_texture", "mean_perimeter", "mean_area", "worst_radius", "worst_area"]
SITES = 3


def p2pfl(*args: str, cwd: Path) -> str:
    """One CLI call; a failure shows what the command printed."""
    done = subprocess.run(
        [sys.executable, "-m", "p2pfl", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"p2pfl {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def write_sites(root: Path) -> None:
    """site0..2.csv with a label column `diagnosis`, holdout.csv, and new_patients.csv without labels."""
    d = load_breast_cancer()
    names = [n.replace(" ", "_") for n in d.feature_names]
    order = np.random.default_rng(1).permutation(len(d.target))

    def write(path: Path, rows: np.ndarray, labelled: bool = True) -> None:
        with path.open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["patient_id", *names, *(["diagnosis"] if labelled else [])])
            for j in rows:
                label = [str(d.target_names[d.target[j]])] if labelled else []
                out.writerow([1000 + int(j), *d.data[j].tolist(), *label])

    for i, part in enumerate(np.array_split(order[:480], SITES)):
        write(root / f"site{i}.csv", part)
    write(root / "holdout.csv", order[480:])
    write(root / "new_patients.csv", order[480:490], labelled=False)


def site_config(default: str, i: int) -> str:
    """The edits the README asks for, applied to `p2pfl config`'s output."""
    edits = {
        'data_dir = "p2pfl-node"': f'data_dir = "h{i}"',
        "port = 18830": "port = 0",
        "expect_peers = 0": f"expect_peers = {SITES - 1}",
        "wait_s = 20.0": "wait_s = 120.0",
        'name = "digits-mlp"': 'name = "mlp"',
        'data = ""': f'data = "site{i}.csv"',
        'label_column = "label"': 'label_column = "diagnosis"',
        "class_names = []": 'class_names = ["malignant", "benign"]',
        "features = []": "features = [" + ", ".join(f'"{f}"' for f in FEATURES) + "]",
        "standardize = false": "standardize = true",
        'optimizer = "sgd"': 'optimizer = "adam"',
        "lr = 0.3": "lr = 0.005",
        "rounds = 20": "rounds = 15",
        "round_timeout_s = 30.0": "round_timeout_s = 120.0",
    }
    text = default
    for old, new in edits.items():
        assert old in text, f"`p2pfl config` no longer prints {old!r}: update the README recipe"
        text = text.replace(old, new, 1)
    return text


@pytest.mark.timeout(600)
def test_three_hospitals_by_hand_to_predictions(tmp_path: Path) -> None:
    write_sites(tmp_path)
    p2pfl("federation", "init", "--dir", "fed", cwd=tmp_path)
    default = p2pfl("config", cwd=tmp_path)
    for i in range(SITES):
        p2pfl("keys", "--data-dir", f"h{i}", cwd=tmp_path)  # on the device
        inbox = tmp_path / f"to-admin-{i}"  # only node.pub travels to the admin ...
        inbox.mkdir()
        shutil.copy(tmp_path / f"h{i}" / "node.pub", inbox)
        p2pfl("federation", "issue", f"hospital-{i}", "--dir", "fed", "--node-dir", inbox.name, cwd=tmp_path)
        for name in ("certificate", "federation.pub", "node.crt", "ca.crt"):  # ... and four files back
            shutil.copy(inbox / name, tmp_path / f"h{i}")
        (tmp_path / f"h{i}.toml").write_text(site_config(default, i))
    assert not any((tmp_path / f"to-admin-{i}" / "signing.key").exists() for i in range(SITES))

    logs = [(tmp_path / f"h{i}.log").open("wb") for i in range(SITES)]
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "p2pfl", "node", "--config", f"h{i}.toml"],
            cwd=tmp_path,
            stdout=logs[i],
            stderr=subprocess.STDOUT,
        )
        for i in range(SITES)
    ]
    try:
        codes = [n.wait(timeout=540) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
        for f in logs:
            f.close()
    report = "\n".join((tmp_path / f"h{i}.log").read_text()[-2000:] for i in range(SITES))
    assert codes == [0] * SITES, report

    model = tmp_path / "h0" / "model.npz"
    assert model.exists() and (tmp_path / "h0" / "best_model.npz").exists(), report
    evaluated = p2pfl("evaluate", str(model), "holdout.csv", cwd=tmp_path)
    accuracy = float(evaluated.split("accuracy")[1].split()[0])
    assert accuracy > 0.8, evaluated
    p2pfl("predict", str(model), "new_patients.csv", "--out", "pred.csv", cwd=tmp_path)
    rows = list(csv.DictReader((tmp_path / "pred.csv").open()))
    assert len(rows) == 10 and {r["predicted"] for r in rows} <= {"malignant", "benign"}
