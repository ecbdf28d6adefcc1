"""The testbed's training options, the warm-up before round 1, the fork server, and memory figures."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pfl import testbed
from p2pfl.envelope import ReplayGuard
from p2pfl.faultlab import signal_group
from p2pfl.federation import FederationAuthority
from p2pfl.identity import load_or_create
from p2pfl.learning import get_params, load_task
from p2pfl.learning.spec import TaskSpec
from p2pfl.memory import MemoryWatch, sample
from p2pfl.node import load_credentials
from p2pfl.warmup import warm_crypto, warm_training
from p2pfl.zygote import Zygote

WAIT_S = 180  # node processes on a loaded 2-core machine: generous, they start as soon as peers are found


# -- training options ----------------------------------------------------------------------------------


def test_training_options_reach_every_node_config() -> None:
    args = testbed.parse_args(
        ["--nodes", "3", "--lr", "0.05", "--local-epochs", "2", "--batch-size", "16", "--optimizer", "adam"]
    )
    assert testbed.node_config(args, 0, Path("node-0")).gossip.min_wait_s == 1.0  # the nodes' default
    waiting = testbed.parse_args(["--min-wait", "600", "--round-timeout", "600"])
    assert testbed.node_config(waiting, 0, Path("node-0")).gossip.min_wait_s == 600.0
    for i in range(3):
        task = testbed.node_config(args, i, Path(f"node-{i}")).task
        assert (task.lr, task.local_epochs, task.batch_size, task.optimizer) == (0.05, 2, 16, "adam")
        assert (task.shard, task.num_shards) == (i, 3)


def test_adam_without_lr_gets_a_rate_adam_accepts() -> None:
    args = testbed.parse_args(["--optimizer", "adam"])
    assert testbed.node_config(args, 0, Path("node-0")).task.lr == testbed.ADAM_LR
    assert testbed.node_config(testbed.parse_args([]), 0, Path("node-0")).task.lr == TaskSpec.lr


def test_a_data_file_is_split_and_a_folder_gives_one_file_per_node(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(2):
        np.savez(tmp_path / f"site-{i}.npz", X=rng.normal(size=(40, 3)), y=np.arange(40) % 2)
    args = testbed.parse_args(["--nodes", "2", "--data", str(tmp_path / "site-0.npz")])
    tasks = [testbed.node_config(args, i, Path(f"node-{i}")).task for i in range(2)]
    assert {t.data for t in tasks} == {str(tmp_path / "site-0.npz")}
    assert [(t.shard, t.num_shards) for t in tasks] == [(0, 2), (1, 2)]

    args = testbed.parse_args(["--nodes", "2", "--data", str(tmp_path)])
    tasks = [testbed.node_config(args, i, Path(f"node-{i}")).task for i in range(2)]
    assert [t.data for t in tasks] == [str(tmp_path / "site-0.npz"), str(tmp_path / "site-1.npz")]
    assert [(t.shard, t.num_shards) for t in tasks] == [(0, 1), (0, 1)]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--lr", "0"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--local-epochs", "0"], "--local-epochs"),
        (["--batch-size", "x"], "--batch-size"),
        (["--optimizer", "rmsprop"], "--optimizer"),
        (["--data", "/nonexistent/p2pfl.csv"], "no such file"),
        (["--data", __file__], ".csv"),
    ],
)
def test_bad_training_options_end_with_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        testbed.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err


def test_a_folder_with_the_wrong_number_of_files_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.savez(tmp_path / "only.npz", X=np.zeros((4, 2)), y=np.array([0, 1, 0, 1]))
    with pytest.raises(SystemExit):
        testbed.main(["--nodes", "3", "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert "1 .csv/.npz file(s) but 3 nodes" in err


def test_a_rate_the_optimizer_refuses_fails_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert testbed.main(["--optimizer", "adam", "--lr", "0.5", "--out", str(out)]) == 2
    assert "adam" in capsys.readouterr().err and not out.exists()


def test_an_unreadable_data_file_fails_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")  # no label column
    assert testbed.main(["--data", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "label" in err


# -- warm-up ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_warm_up_leaves_training_exactly_as_without_it(optimizer: str) -> None:
    """The same spec trained twice, once after a warm-up: same losses, same weights, same RNG after."""
    spec = TaskSpec("digits-mlp", 1, 4, optimizer=optimizer, lr=0.01 if optimizer == "adam" else 0.3)

    def run(warm: bool) -> tuple[list[float], dict[str, np.ndarray], torch.Tensor]:
        torch.manual_seed(123)
        task = load_task(spec)
        model = task.build_model()
        if warm:
            warm_training(task, model)
        losses = [task.train(model) for _ in range(2)]
        return losses, get_params(model), torch.random.get_rng_state()

    cold, warm = run(False), run(True)
    assert cold[0] == warm[0]
    assert all(np.array_equal(cold[1][k], warm[1][k]) for k in cold[1])
    assert torch.equal(cold[2], warm[2])


def test_warm_up_of_a_task_without_warm_up_still_evaluates_a_copy() -> None:
    seen: list[torch.nn.Module] = []

    class Plain:
        num_samples = 1

        def build_model(self) -> torch.nn.Module:
            return torch.nn.Linear(2, 2)

        def train(self, model: torch.nn.Module) -> float:
            raise AssertionError("warm-up must not train the task")

        def evaluate(self, model: torch.nn.Module) -> tuple[float, float]:
            seen.append(model)
            return 0.0, 0.0

    model = Plain().build_model()
    before = {k: v.copy() for k, v in get_params(model).items()}
    warm_training(Plain(), model)
    assert len(seen) == 1 and seen[0] is not model
    assert all(np.array_equal(before[k], v) for k, v in get_params(model).items())


def test_warm_crypto_seals_and_opens_without_touching_state(tmp_path: Path) -> None:
    authority = FederationAuthority.create(tmp_path / "fed")
    identity = load_or_create(tmp_path / "n")
    authority.issue(
        "n", identity.verify_key_bytes, identity.box_public_bytes, 3600.0, node_dir=tmp_path / "n"
    )
    identity, cert, root = load_credentials(tmp_path / "n")
    guard = ReplayGuard()
    warm_crypto(torch.nn.Linear(3, 2), identity, cert, root)
    assert guard.state() == {}


# -- memory -----------------------------------------------------------------------------------------


def test_memory_watch_reports_peaks_per_node_and_summed() -> None:
    watch = MemoryWatch()
    me = os.getpid()
    watch.poll([("a", me), ("b", me)], [("helper", me)])
    got = sample(me)
    assert got is not None and got["uss_mb"] <= got["pss_mb"] <= got["rss_mb"]
    summary = watch.summary(["a", "b"])
    assert summary["nodes_sampled"] == 2
    assert summary["rss_mb_median"] > 0 and summary["rss_mb_max"] >= summary["rss_mb_median"]
    assert summary["rss_mb_sum_peak"] >= 3 * summary["rss_mb_median"] * 0.9  # helper is summed too
    assert set(summary["others"]) == {"helper"}
    assert sample(2**22 + 12345) is None  # no such process


# -- the fork server --------------------------------------------------------------------------------


def wait_until(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f} s"
        time.sleep(0.2)


def _in_state(pid: int, states: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in states
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_forked_nodes_are_real_processes_the_fault_lab_can_signal(tmp_path: Path) -> None:
    """A node forked by the server leads its own process group, can be frozen, thawed and killed -9,
    reports its exit status, and dies with the server."""
    args = testbed.parse_args(["--nodes", "3", "--wait", str(WAIT_S), "--rounds", "5"])
    configs = testbed.prepare(args, tmp_path)
    server = Zygote(configs[0], tmp_path / "zygote.log")
    try:
        quick = server.spawn(["config"], tmp_path / "config.log")
        assert quick.wait(timeout=120) == 0
        assert "[task]" in (tmp_path / "config.log").read_text()

        waiting = [server.spawn(["node", "--config", str(c)], c.parent / "node.log") for c in configs[:2]]
        victim, bystander = waiting
        assert os.getpgid(victim.pid) == victim.pid  # a session of its own, as with exec
        assert victim.poll() is None
        signal_group(victim.pid, signal.SIGSTOP)
        wait_until(lambda: _in_state(victim.pid, "T"), 60, "the node frozen")
        signal_group(victim.pid, signal.SIGCONT)
        wait_until(lambda: not _in_state(victim.pid, "T"), 60, "the node thawed")
        signal_group(victim.pid, signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL
    finally:
        server.close()
    wait_until(lambda: bystander.poll() is not None, 120, "the other node gone with the server")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_forked_federation_trains_with_the_options_and_reports_memory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["--nodes", "3", "--rounds", "4", "--wait", str(WAIT_S), "--out", str(out), "--topology", "full",
            "--optimizer", "sgd", "--lr", "0.2", "--batch-size", "16", "--local-epochs", "2"]  # fmt: skip
    assert testbed.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "warmed up" in (out / "node-0" / "node.log").read_text()
    memory = summary["memory"]
    assert memory["nodes_sampled"] == 3
    assert 0 < memory["pss_mb_median"] <= memory["rss_mb_median"]
    assert "fork-server" in memory["others"]
    times = summary["round_times"]
    assert times["round1_s"] > 0 and times["steady_s"] > 0
    for n in summary["nodes"]:
        rows = testbed.read_metrics(out / n["name"] / "metrics.jsonl")
        assert [r["round"] for r in rows] == [1, 2, 3, 4]
        assert all(r["train_cpu_s"] > 0 and r["seal_cpu_s"] > 0 and r["mix_cpu_s"] >= 0 for r in rows)
        assert sum(r["open_cpu_s"] for r in rows) > 0
        assert "batch_size = 16" in (out / n["name"] / "node.toml").read_text()


# -- the scale benchmark's figures ------------------------------------------------------------------


def test_bench_scale_figures_from_metrics(tmp_path: Path) -> None:
    """Round 1 against the steady rounds, the work floor from the CPU fields, links when recorded."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_scale", Path(__file__).parents[1] / "scripts/bench_scale.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    nodes = []
    for i in range(2):
        rows = [
            {"round": r, "round_s": 2.0 if r == 1 else 0.5, "train_cpu_s": 0.2, "seal_cpu_s": 0.1,
             "open_cpu_s": 0.1, "mix_cpu_s": 0.1, "neighbours": {"x": {}}, **({"links": 3} if i else {})}
            for r in range(1, 6)
        ]  # fmt: skip
        (tmp_path / f"node-{i}").mkdir()
        (tmp_path / f"node-{i}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        nodes.append({"name": f"node-{i}", "final_accuracy": 0.9 + i / 100, "rounds_completed": 5})
    (tmp_path / "summary.json").write_text(json.dumps({"nodes": nodes, "memory": None, "wall_s": 9.0}))
    f = bench.figures(tmp_path, cores=2, target=0.9)
    assert f["round1_s"] == 2.0 and f["steady_round_s"] == 0.5 and f["round1_ratio"] == 4.0
    assert f["floor_s"] == pytest.approx(2 * 0.5 / 2)  # two nodes x 0.5 CPU-s per round on 2 cores
    assert f["round_over_floor"] == pytest.approx(1.0)
    assert f["links_median"] == 3 and f["degree_median"] == 1
    assert f["acc_min"] == 0.9 and f["all_at_target"]
    assert "| 4.00 |" in bench.table({2: f})


def test_memory_caption_of_a_run_stopped_before_any_summed_sample() -> None:
    """A run stopped early (here: the 256-node run at the memory floor) has per-node peaks but no
    summed one; the summary says what it has instead of ending in a traceback."""
    memory = {"rss_mb_median": 384.0, "rss_mb_max": 390.0, "pss_mb_median": 61.0, "pss_mb_max": 70.0}
    stopped = testbed._memory_caption({**memory, "rss_mb_sum_peak": None, "pss_mb_sum_peak": None})
    assert "PSS median 61 MB" in stopped and "summed" not in stopped
    full = testbed._memory_caption(
        {
            **memory,
            "rss_mb_sum_peak": 98_000.0,
            "pss_mb_sum_peak": 15_600.0,
            "others": {"fork": {"pss_mb": 105.0}},
        }
    )
    assert full.endswith("summed: RSS 98.00 GB, PSS 15.60 GB (fork server PSS 105 MB included)")
