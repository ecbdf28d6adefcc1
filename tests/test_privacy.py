"""Differential privacy ([privacy], p2pfl.learning.privacy) and federated standardisation
([task] standardize_federated): what is trained, what is accounted, what survives a restart or a
mixing step, and what is refused."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from p2pfl.config import NodeConfig, from_dict, validate
from p2pfl.errors import ConfigError
from p2pfl.learning import TaskSpec, get_params, load_task, set_params
from p2pfl.learning.privacy import (
    STATE_FILE,
    DPTraining,
    PrivacyBudgetSpent,
    attach_privacy,
    check_model,
    sample_rate,
    steps_per_epoch,
)
from p2pfl.learning.tasks import FederatedStandardize, TensorTask, tensor_task

pytest.importorskip("opacus")


def _task(**kw: object) -> TensorTask:
    task = load_task(TaskSpec("digits-mlp", 0, 4, **kw))  # type: ignore[arg-type]
    assert isinstance(task, TensorTask)
    return task


def _dp(task: TensorTask, path: Path | None = None, **kw: object) -> DPTraining:
    args: dict[str, object] = {
        "num_samples": task.num_samples,
        "batch_size": task.spec.batch_size,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "seed": 7,
        "state_path": path,
    }
    args.update(kw)
    return DPTraining(**args)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ DP-SGD training


def test_dp_sgd_trains_and_accounts_every_poisson_step() -> None:
    """Each round adds local_epochs x int(1/q) steps at q = batch / n to the accountant, and epsilon
    is what Opacus' RDP accountant gives for exactly that history."""
    from opacus.accountants import RDPAccountant

    task = _task(local_epochs=2)
    task.privacy = _dp(task)
    model = task.build_model()
    before = task.evaluate(model)[0]
    eps: list[float] = []
    for _ in range(4):
        loss = task.train(model)
        assert np.isfinite(loss)
        spent = task.epsilon
        assert spent is not None
        eps.append(spent)
    q = sample_rate(task.num_samples, 32)
    assert q == pytest.approx(32 / task.num_samples)
    assert task.privacy.accountant.history == [(1.0, q, 4 * 2 * steps_per_epoch(q))]
    reference = RDPAccountant()
    reference.history = [(1.0, q, 4 * 2 * steps_per_epoch(q))]
    assert eps[-1] == pytest.approx(reference.get_epsilon(delta=1e-5))
    assert all(a < b for a, b in zip(eps, eps[1:], strict=False)) and eps[0] > 0
    assert task.evaluate(model)[0] > before  # noisy, but it learns


def test_without_privacy_epsilon_is_none() -> None:
    assert _task().epsilon is None


def test_the_noise_is_not_the_federations_seed() -> None:
    """Two nodes with the same spec (same [task] seed) draw different noise: the generator is seeded
    from the OS, so a neighbour cannot replay it."""
    a, b = _task(), _task()
    a.privacy = _dp(a, seed=None)
    b.privacy = _dp(b, seed=None)
    ma, mb = a.build_model(), b.build_model()
    a.train(ma)
    b.train(mb)
    assert not np.allclose(get_params(ma)["0.weight"], get_params(mb)["0.weight"])


def test_mixing_reaches_the_wrapped_model_and_the_optimizer() -> None:
    """Opacus wraps the model in a GradSampleModule that hooks the model's own modules: set_params
    (what the node does after mixing) writes into the tensors DP-SGD trains and the optimizer steps."""
    task = _task(lr=1e-6, optimizer="sgd", momentum=0.9)
    task.privacy = _dp(task)
    model = task.build_model()
    task.train(model)  # wraps the model, creates the optimizer
    assert task.privacy._wrapped is not None
    gsm = task.privacy._wrapped.gsm
    mixed = {k: v + 0.5 for k, v in get_params(model).items()}
    set_params(model, mixed)
    for (name, p), (gname, gp) in zip(model.named_parameters(), gsm.named_parameters(), strict=True):
        assert gp is p and gname.endswith(name)
        assert np.allclose(gp.detach().numpy(), mixed[name])
    opt = task._optimizers[model]
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], model.parameters(), strict=True))
    task.train(model)  # tiny lr: the next round starts from the mixed weights
    after = get_params(model)
    assert all(np.allclose(after[k], mixed[k], atol=1e-3) for k in mixed)
    assert task.privacy._wrapped.gsm is gsm  # the same wrapper round after round


def test_accountant_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    task = _task()
    task.privacy = _dp(task, path)
    model = task.build_model()
    task.train(model)
    task.train(model)
    spent, steps = task.epsilon, task.privacy.steps
    assert spent is not None and spent > 0 and json.loads(path.read_text())["epsilon"] == pytest.approx(spent)
    again = _task()
    again.privacy = _dp(again, path)  # a restarted node: same data dir
    assert again.epsilon == pytest.approx(spent) and again.privacy.steps == steps
    again.train(again.build_model())
    assert again.privacy.steps == 3 * steps // 2 and again.epsilon is not None and again.epsilon > spent


def test_an_unreadable_accountant_record_stops_the_node(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="epsilon this node already spent is unknown"):
        _dp(_task(), path)


def test_models_opacus_cannot_train_are_refused_with_what_to_do() -> None:
    with pytest.raises(ConfigError, match=r"\[privacy\] DP-SGD cannot train this model.*enabled = false"):
        check_model(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)))
    check_model(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))  # fine


def test_target_epsilon_derives_the_noise_and_stops_at_the_budget(tmp_path: Path) -> None:
    cfg = NodeConfig()
    cfg.node.data_dir = str(tmp_path)
    cfg.task = TaskSpec("logreg", 0, 4)
    cfg.training.rounds = 3
    cfg.privacy.enabled, cfg.privacy.target_epsilon = True, 2.0
    cfg = validate(cfg)
    task = attach_privacy(load_task(cfg.task), cfg)
    assert task.privacy is not None and task.privacy.noise_multiplier > 0
    model = task.build_model()
    for _ in range(3):
        task.train(model)
    assert 1.5 < task.epsilon <= 2.0 * 1.001
    with pytest.raises(PrivacyBudgetSpent, match="past \\[privacy\\] target_epsilon = 2"):
        task.train(model)
    assert (tmp_path / STATE_FILE).exists()


def test_custom_tasks_are_refused_with_what_to_do(tmp_path: Path) -> None:
    cfg = NodeConfig()
    cfg.node.data_dir = str(tmp_path)
    cfg.privacy.enabled, cfg.privacy.noise_multiplier = True, 1.0

    class Custom:
        num_samples = 10

    with pytest.raises(ConfigError, match="Return a p2pfl.learning.TensorTask"):
        attach_privacy(Custom(), validate(cfg))
    cfg.privacy.enabled = False
    plain = Custom()
    assert attach_privacy(plain, cfg) is plain


# ------------------------------------------------------------------------------------ the config


def test_privacy_is_off_by_default_and_round_trips() -> None:
    from p2pfl.config import to_toml

    cfg = validate(NodeConfig())
    assert not cfg.privacy.enabled
    text = to_toml(cfg)
    assert "[privacy]" in text and "enabled = false" in text
    raw = {"privacy": {"enabled": True, "noise_multiplier": 1, "max_grad_norm": 0.5, "accountant": "prv"}}
    loaded = from_dict(raw)
    assert loaded.privacy.noise_multiplier == 1.0 and loaded.privacy.accountant == "prv"


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"enabled": True}, "exactly one of noise_multiplier"),
        (
            {"enabled": True, "noise_multiplier": 1.0, "target_epsilon": 3.0},
            "exactly one of noise_multiplier",
        ),
        ({"noise_multiplier": -1.0}, r"noise_multiplier must be a finite number >= 0"),
        ({"delta": 1.5}, "delta must be below 1"),
        ({"accountant": "gdp"}, "accountant must be one of rdp, prv"),
        ({"epochs": -1}, "epochs must be >= 0"),
        ({"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
        ({"enabled": "yes"}, r"\[privacy\] enabled must be bool"),
        ({"noise": 1.0}, r"unknown key\(s\) \['noise'\] in \[privacy\]"),
    ],
)
def test_bad_privacy_settings_are_refused(section: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        from_dict({"privacy": section})


def test_target_epsilon_needs_a_horizon() -> None:
    raw = {"privacy": {"enabled": True, "target_epsilon": 4.0}, "training": {"rounds": 0}}
    with pytest.raises(ConfigError, match="needs \\[privacy\\] epochs"):
        from_dict(raw)
    raw["privacy"]["epochs"] = 50  # type: ignore[index]
    assert from_dict(raw).privacy.epochs == 50


def test_dp_with_gossiped_statistics_is_refused() -> None:
    """The federated standardisation layer starts from the site's own means, sent as they are."""
    raw = {
        "privacy": {"enabled": True, "noise_multiplier": 1.0},
        "task": {"standardize": True, "standardize_federated": True},
    }
    with pytest.raises(ConfigError, match="DP-SGD does not protect"):
        from_dict(raw)


# ------------------------------------------------------------------------------------ federated standardisation


def _scaled_task(shift: float, scale: float, shard: int, seed: int = 0) -> TensorTask:
    """A site drawing its population at its own offset and scale; the label follows one rule in raw
    units everywhere (feature 0 above feature 1)."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(240, 3)) * scale + shift).astype(np.float32)
    y = (x[:, 0] > x[:, 1]).astype(np.int64)
    spec = TaskSpec("mlp", standardize=True, standardize_federated=True, lr=0.1)
    from p2pfl.learning.tasks import model_factory

    return tensor_task(spec, x, y, make_model=model_factory(spec, 3, 2), classes=2)


def _layer(model: nn.Module) -> FederatedStandardize:
    layer = model.get_submodule("scale")
    assert isinstance(layer, FederatedStandardize)
    return layer


def test_spec_checks_for_federated_standardisation() -> None:
    with pytest.raises(ConfigError, match="set \\[task\\] standardize = true as well"):
        TaskSpec("mlp", standardize_federated=True)
    with pytest.raises(ConfigError, match="keep one"):
        TaskSpec("mlp", standardize=True, standardize_federated=True, feature_stats="s.json")


def test_each_node_starts_from_its_own_statistics() -> None:
    task = _scaled_task(1000.0, 50.0, 0)
    assert task.standardizer is None  # the model scales, not the data pipeline
    layer = _layer(task.build_model())
    x = task.x_train.numpy().astype(np.float64)
    assert np.allclose(layer.mean.numpy(), x.mean(axis=0), rtol=1e-4)
    assert np.allclose(layer.std.numpy(), x.std(axis=0), rtol=1e-4)
    scaled = layer(task.x_train).detach().numpy()
    assert np.allclose(scaled.mean(axis=0), 0, atol=1e-2) and np.allclose(scaled.std(axis=0), 1, atol=1e-2)


def test_gossip_averaging_agrees_the_statistics_and_training_uses_them() -> None:
    """Three sites with shifted feature scales; plain averaging (what mixing does) drives every
    node's statistics to one consensus, between the sites' own; the weights are trained on inputs
    scaled by the current statistics, and no optimizer touches the statistics."""
    sites = [(0.0, 1.0), (3.0, 2.0), (-2.0, 0.5)]
    tasks = [_scaled_task(s, c, i, seed=i) for i, (s, c) in enumerate(sites)]
    models = [t.build_model() for t in tasks]
    own = [(_layer(m).mean.clone(), _layer(m).std.clone()) for m in models]
    for _ in range(30):
        for t, m in zip(tasks, models, strict=True):
            before = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("scale.")}
            t.train(m)
            assert all(torch.equal(before[k], m.state_dict()[k]) for k in before)  # training leaves them
        params = [get_params(m) for m in models]
        for m in models:
            set_params(m, {k: np.mean([p[k] for p in params], axis=0) for k in params[0]})
    means = np.stack([_layer(m).mean.numpy() for m in models])
    stds = np.stack([_layer(m).std.numpy() for m in models])
    assert np.allclose(means, means[0], rtol=1e-5) and np.allclose(stds, stds[0], rtol=1e-5)
    low = np.min([o[0].numpy() for o in own], axis=0)
    high = np.max([o[0].numpy() for o in own], axis=0)
    assert np.all((low <= means[0]) & (means[0] <= high))
    # the forward pass scales with the agreed statistics
    x = tasks[1].x_test
    expected = (x - torch.as_tensor(means[0])) / torch.as_tensor(stds[0])
    assert torch.allclose(_layer(models[1])(x), expected, atol=1e-4)
    # and the models learned through that scaling, on every site's own data
    assert all(t.evaluate(m)[0] > 0.75 for t, m in zip(tasks, models, strict=True))


def test_the_model_file_carries_the_layer(tmp_path: Path) -> None:
    """`p2pfl predict` feeds raw features: the rebuilt model scales them with the agreed statistics."""
    from p2pfl import model_file

    task = _scaled_task(100.0, 5.0, 0)
    model = task.build_model()
    task.train(model)
    path = tmp_path / "model.npz"
    model_file.save_model(path, get_params(model), task.spec, model_file.task_meta(task))
    params, spec, meta = model_file.load_model(path)
    assert "scale.shift" in params and meta["feature_mean"] is None
    rebuilt = model_file.build_model(params, spec, meta)
    model.eval()
    assert torch.allclose(rebuilt(task.x_test), model(task.x_test), atol=1e-5)


# ------------------------------------------------------------------------------------ real nodes


@pytest.mark.timeout(300)
def test_nodes_report_epsilon_every_round_and_keep_it_across_a_restart(tmp_path: Path) -> None:
    """Two nodes over the in-memory mesh with DP-SGD: every metrics record carries the epsilon spent
    so far, rising; a node built again from the same data dir starts from that epsilon, not 0."""
    from helpers import certify
    from memory_mesh import Hub

    from p2pfl.federation import FederationAuthority
    from p2pfl.metrics import read_jsonl
    from p2pfl.node import Node

    hub, authority, nodes = Hub(), FederationAuthority.create(tmp_path / "federation"), []
    for i in range(2):
        cfg = NodeConfig()
        cfg.node.name, cfg.node.data_dir = f"n{i}", str(tmp_path / f"n{i}")
        cfg.discovery.expect_peers, cfg.discovery.wait_s = 1, 120.0
        cfg.task = TaskSpec("logreg", i, 2, lr=0.3)
        cfg.training.rounds = 3
        cfg.gossip.topology, cfg.gossip.rule = "full", "mean"
        cfg.gossip.round_timeout_s, cfg.gossip.linger_s = 120.0, 0.0
        cfg.privacy.enabled, cfg.privacy.noise_multiplier = True, 1.0
        cfg = validate(cfg)
        _, cert = certify(authority, cfg.node.name, cfg.data_dir)
        nodes.append(Node(cfg, mesh=hub.mesh(cert)))

    async def main() -> None:
        await asyncio.gather(*(node.run() for node in nodes))

    asyncio.run(main())
    for node in nodes:
        records = read_jsonl(node.cfg.metrics_path)
        eps = [r["epsilon"] for r in records]
        assert [r["round"] for r in records] == [1, 2, 3]
        assert all(e is not None and e > 0 for e in eps) and eps == sorted(eps) and eps[0] < eps[-1]
        assert sum(node.metrics.rejected.values()) == 0
    first = nodes[0]
    last = read_jsonl(first.cfg.metrics_path)[-1]["epsilon"]
    restarted = Node(first.cfg, mesh=Hub().mesh(first.cert))
    assert restarted.core.round == 3 and getattr(restarted.task, "epsilon", None) == pytest.approx(last)


@pytest.mark.timeout(300)
def test_nodes_agree_their_feature_statistics_by_gossip(tmp_path: Path) -> None:
    """Three nodes with their own files at different feature scales, [task] standardize_federated:
    after a few rounds of real mixing every node holds the same statistics, and no update was refused
    or down-weighted for its scale."""
    from helpers import certify
    from memory_mesh import Hub

    from p2pfl.federation import FederationAuthority
    from p2pfl.metrics import read_jsonl
    from p2pfl.node import Node

    hub, authority, nodes = Hub(), FederationAuthority.create(tmp_path / "federation"), []
    rng = np.random.default_rng(3)
    for i, (shift, scale) in enumerate([(0.0, 1.0), (4.0, 3.0), (-3.0, 0.5)]):
        x = rng.normal(size=(200, 4))
        y = (x[:, 0] - x[:, 2] > 0).astype(np.int64)
        data = tmp_path / f"site{i}.npz"
        np.savez(data, X=x * scale + shift, y=y)
        cfg = NodeConfig()
        cfg.node.name, cfg.node.data_dir = f"site{i}", str(tmp_path / f"n{i}")
        cfg.discovery.expect_peers, cfg.discovery.wait_s = 2, 120.0
        cfg.task = TaskSpec(
            "mlp", data=str(data), num_classes=2, standardize=True, standardize_federated=True, lr=0.1
        )
        cfg.training.rounds = 12
        cfg.gossip.topology = "full"  # the default robust rule
        cfg.gossip.round_timeout_s, cfg.gossip.linger_s = 120.0, 0.0
        cfg = validate(cfg)
        _, cert = certify(authority, cfg.node.name, cfg.data_dir)
        nodes.append(Node(cfg, mesh=hub.mesh(cert)))

    async def main() -> None:
        await asyncio.gather(*(node.run() for node in nodes))

    asyncio.run(main())
    shifts = np.stack([_layer(n.model).shift.numpy() for n in nodes])
    scales = np.stack([_layer(n.model).log_scale.numpy() for n in nodes])
    own_spread = np.ptp([_layer(n.task.build_model()).shift.numpy() for n in nodes], axis=0)
    assert np.all(np.ptp(shifts, axis=0) < 1e-3 * own_spread)
    assert np.allclose(scales, scales[0], atol=1e-3)
    for node in nodes:
        records = read_jsonl(node.cfg.metrics_path)
        assert sum(node.metrics.rejected.values()) == 0
        assert not any(nb["downweighted"] for r in records for nb in r["neighbours"].values())
        assert records[-1]["accuracy"] > 0.8
