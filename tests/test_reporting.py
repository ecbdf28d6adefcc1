"""`p2pfl report`: the summary, table and plots of node metrics found in any folder tree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from p2pfl import cli, reporting
from p2pfl.reporting import NodeRun, ReportError, find_node_runs, summarize


def write_node(
    directory: Path,
    name: str,
    accuracies: list[float],
    *,
    models: list[np.ndarray] | None = None,
    settings: dict | None = None,
    attack: str | None = None,
    tail: str = "",
) -> Path:
    """A node's data dir as a node leaves it: metrics.jsonl (bytes counters growing 100 a round),
    and models/round_NNNN.npy when given."""
    directory.mkdir(parents=True, exist_ok=True)
    records = []
    for i, acc in enumerate(accuracies):
        record = {
            "round": i + 1,
            "node": name,
            "accuracy": acc,
            "round_s": 0.5,
            "time": 1000.0 + i,
            "bytes_out": 100 * (i + 1),
            "bytes_in": 50 * (i + 1),
            "rejected": {"replay": i},
            "attack": attack,
        }
        if i == 0 and settings is not None:
            record["settings"] = settings
        records.append(json.dumps(record))
    (directory / "metrics.jsonl").write_text("\n".join(records) + "\n" + tail)
    for r, m in enumerate(models or [], start=1):
        (directory / "models").mkdir(exist_ok=True)
        np.save(directory / "models" / f"round_{r:04d}.npy", m.astype(np.float32))
    return directory


SETTINGS = {"task": "digits-mlp", "partition": "iid", "topology": "ring", "rule": "robust", "rounds": 3}


def test_nodes_copied_from_several_machines_are_found_by_their_own_names(tmp_path: Path) -> None:
    """A hand-run federation: data dirs in arbitrary folders, names from the records, natural order."""
    write_node(tmp_path / "site-b" / "p2pfl-node", "hospital-10", [0.5, 0.6], settings=SETTINGS)
    write_node(tmp_path / "site-a" / "data", "hospital-2", [0.4, 0.7], settings=SETTINGS)
    (tmp_path / "site-a" / "notes.txt").write_text("not metrics")
    runs = find_node_runs(tmp_path)
    assert [r.name for r in runs] == ["hospital-2", "hospital-10"]
    summary = summarize(runs)
    assert summary["settings"] == {"nodes": 2, **SETTINGS}
    assert summary["mean_accuracy"] == pytest.approx(0.65)
    assert summary["consensus_distance"]["last"] is None  # no saved models: no consensus figure
    assert summary["wall_s"] == pytest.approx(1001.0 - 999.5)
    json.dumps(summary)


def test_settings_come_from_node_toml_when_the_records_lack_them(tmp_path: Path) -> None:
    a = write_node(tmp_path / "a", "a", [0.5])
    b = write_node(tmp_path / "b", "b", [0.5])
    for directory, rule in ((a, "median"), (b, "mean")):
        (directory / "node.toml").write_text(
            f'[task]\nname = "synthetic-logreg"\n[gossip]\ntopology = "full"\nrule = "{rule}"\n[training]\nrounds = 0\n'
        )
    settings = summarize(find_node_runs(tmp_path))["settings"]
    assert settings["task"] == "synthetic-logreg" and settings["topology"] == "full"
    assert settings["rule"] == "median / mean"  # the nodes disagree: both are shown
    assert reporting.run_title(settings).endswith(
        "rule median / mean, task synthetic-logreg, rounds until stopped"
    )


def test_counters_add_up_over_a_restart_and_a_cut_line_is_skipped(tmp_path: Path) -> None:
    """Each node process counts bytes and refusals from 0; the record with `settings` is a restart."""
    d = write_node(tmp_path / "n", "n", [0.5, 0.6], settings=SETTINGS, tail='{"round": 3, "accur')
    restarted = {"round": 3, "node": "n", "accuracy": 0.7, "bytes_out": 100, "bytes_in": 0, "settings": SETTINGS,
                 "rejected": {"replay": 5}}  # fmt: skip
    with (d / "metrics.jsonl").open("a") as fh:
        fh.write("\n" + json.dumps(restarted) + "\n")
    (run,) = find_node_runs(tmp_path)
    node = reporting.node_summary(run)
    assert node["rounds"] == [1, 2, 3] and node["accuracy_by_round"] == [0.5, 0.6, 0.7]
    assert node["bytes_sent"] == 200 + 100 and node["bytes_sent_by_round"] == [100, 100, 100]
    assert node["rejected_by_reason"] == {"replay": 1 + 5}
    assert node["best_accuracy"] == 0.7 and node["final_accuracy"] == 0.7


def test_consensus_over_honest_nodes_and_byzantine_from_the_records(tmp_path: Path) -> None:
    write_node(tmp_path / "n0", "n0", [0.5, 0.6], models=[np.zeros(4), np.ones(4)])
    write_node(tmp_path / "n1", "n1", [0.7, 0.8], models=[np.ones(4), np.full(4, 3.0)])
    write_node(tmp_path / "n2", "n2", [0.1, 0.1], models=[np.full(4, 50.0)] * 2, attack="sign-flip")
    summary = summarize(find_node_runs(tmp_path))
    assert [n["byzantine"] for n in summary["nodes"]] == [False, False, True]
    assert summary["mean_accuracy"] == pytest.approx(0.7)  # the attacker's accuracy does not enter
    assert summary["consensus_distance"]["by_round"] == pytest.approx([1.0, 4.0])
    paths = reporting.plot_report(summary, tmp_path / "out")
    assert [p.name for p in paths] == ["accuracy.png", "consensus.png", "round_time.png", "bytes.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)


def test_two_files_of_the_same_node_name_stay_apart(tmp_path: Path) -> None:
    write_node(tmp_path / "old", "node", [0.5])
    write_node(tmp_path / "new", "node", [0.6])
    assert sorted(r.name for r in find_node_runs(tmp_path)) == ["node (new)", "node (old)"]


def test_a_folder_without_metrics_says_what_to_point_the_report_at(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"no metrics.jsonl under .*testbed run .*data_dir"):
        find_node_runs(tmp_path)
    with pytest.raises(ReportError, match="does not exist"):
        find_node_runs(tmp_path / "missing")
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "metrics.jsonl").write_text("")
    with pytest.raises(ReportError, match="no round record yet"):
        find_node_runs(tmp_path)


def test_report_command_writes_summary_plots_and_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    write_node(run_dir / "node-0", "node-0", [0.5, 0.9], settings=SETTINGS, models=[np.zeros(3), np.ones(3)])
    write_node(run_dir / "node-1", "node-1", [0.5, 0.8], settings=SETTINGS, models=[np.ones(3), np.ones(3)])
    write_node(run_dir / "node-2", "node-2", [0.5, 0.7], settings=SETTINGS, models=[np.ones(3), np.ones(3)])
    launcher = {
        "nodes": [{"name": "node-1", "exit_code": 137, "alive_at_end": False}],
        "faults": [{"at_round": 2}],
    }
    (run_dir / "summary.json").write_text(json.dumps(launcher))  # a testbed's: exit codes, faults
    assert cli.main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "3 nodes, topology ring, rule robust, task digits-mlp" in out
    assert "node-1 (down)" in out and "137" in out
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    assert summary["mean_accuracy"] == pytest.approx(0.8)  # node-1 was down at the end
    assert summary["consensus_distance"]["by_round"] == pytest.approx([0.75, 0.0])  # node-0, node-2
    assert summary["faults"] == [{"at_round": 2}]
    assert {p.name for p in (run_dir / "report").iterdir()} == {
        "summary.json", "accuracy.png", "consensus.png", "round_time.png", "bytes.png"
    }  # fmt: skip


def test_report_command_on_an_empty_folder_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no metrics.jsonl under") and err.count("\n") == 1


def test_node_run_load_takes_a_launchers_facts(tmp_path: Path) -> None:
    d = write_node(tmp_path / "node-3", "node-3", [0.2], attack="sign-flip")
    run = NodeRun.load(d, name="node-3", exit_code=0, byzantine=False)
    assert not run.is_byzantine and reporting.node_summary(run)["exit_code"] == 0
