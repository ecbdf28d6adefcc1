"""The grid runner: every backend returns what the serial loop returns, in item order."""

from __future__ import annotations

import csv
import runpy
from pathlib import Path

import numpy as np
import pytest

from p2pfl import grid
from p2pfl.errors import ConfigError
from p2pfl.sim import SimConfig

TOPOLOGY_EXPERIMENT = Path(__file__).resolve().parent.parent / "scripts" / "topology_experiment.py"


def square(x: int) -> int:
    return x * x


def configs() -> list[SimConfig]:
    return [
        SimConfig(nodes=6, rounds=2, topology=t, partition=p, seed=s)
        for t, p, s in [("ring", "iid", 0), ("exponential", "dirichlet", 1), ("full", "iid", 2)]
    ]


def test_serial_keeps_order_and_reports_each_result() -> None:
    seen: list[tuple[int, int]] = []
    assert grid.run_grid(square, [3, 1, 2], on_result=lambda i, r: seen.append((i, r))) == [9, 1, 4]
    assert seen == [(0, 9), (1, 1), (2, 4)] and grid.run_grid(square, []) == []


def test_errors_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="known: serial, process, ray"):
        grid.run_grid(square, [1], backend="cluster")
    with pytest.raises(ConfigError, match="workers"):
        grid.run_grid(square, [1], backend="process", workers=0)
    monkeypatch.setattr(grid, "ray_available", lambda: False)
    with pytest.raises(ConfigError, match="pip install ray"):
        grid.run_grid(square, [1], backend="ray")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_process_pool_gives_the_serial_results() -> None:
    serial = grid.run_grid(grid.simulate, configs())
    pooled = grid.run_grid(grid.simulate, configs(), backend="process", workers=2)
    for a, b in zip(serial, pooled, strict=True):
        assert np.array_equal(a.vectors, b.vectors)
        assert [r.mean_accuracy for r in a.rounds] == [r.mean_accuracy for r in b.rounds]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_local_cluster_gives_the_serial_results() -> None:
    pytest.importorskip("ray")
    serial = grid.run_grid(grid.simulate, configs()[:2])
    on_ray = grid.run_grid(grid.simulate, configs()[:2], backend="ray", workers=2)
    for a, b in zip(serial, on_ray, strict=True):
        assert np.array_equal(a.vectors, b.vectors)


def _topology_grid(out: Path, *backend: str) -> tuple[list[dict], list[dict]]:
    """scripts/topology_experiment.py on a tiny grid: (rounds.csv, summary.csv without seconds)."""
    main = runpy.run_path(str(TOPOLOGY_EXPERIMENT), run_name="topology_experiment")["main"]
    argv = ["--topologies", "ring,full", "--sizes", "6", "--rules", "mean,weighted", "--rounds", "3"]
    assert main([*argv, "--no-plots", "--out", str(out), *backend]) == 0
    rounds = list(csv.DictReader(open(out / "rounds.csv")))
    summary = [
        {k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(out / "summary.csv"))
    ]
    return rounds, summary


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_topology_experiment_on_a_process_pool_writes_the_serial_results(tmp_path: Path) -> None:
    serial = _topology_grid(tmp_path / "serial")
    pooled = _topology_grid(tmp_path / "pool", "--backend", "process", "--workers", "2")
    assert len(serial[1]) == 6 and len(serial[0]) == 6 * 3  # 2 topologies x (iid + dirichlet x 2 rules)
    assert pooled == serial
