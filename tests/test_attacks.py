"""Attacks: every crafted vector is finite float32 of the model's shape and has its defining property."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p2pfl.attacks import ALIE, ATTACKS, Attack, Replay, alie_z, make_attack
from p2pfl.errors import ConfigError
from p2pfl.learning import TaskSpec, get_params, load_task

P = 200

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def vecs(k: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=P)
    return [(base + 0.1 * rng.normal(size=P)).astype(np.float32) for _ in range(k)]


@pytest.mark.parametrize("name", ATTACKS)
def test_every_attack_sends_finite_float32_of_the_right_shape(name: str) -> None:
    attack = make_attack(name, seed=1)
    assert isinstance(attack, Attack) and attack.name == name
    own, *heard = vecs(5)
    huge = np.full(P, 3e38, dtype=np.float32)  # a hostile neighbour near float32 max
    broken = heard[0].copy()
    broken[3] = np.nan
    for r, h in enumerate(
        [[], heard, [huge, *heard], [broken], [np.zeros(P + 1, dtype=np.float32)]], start=1
    ):
        out = attack.craft(own, h, r)
        assert out.shape == own.shape and out.dtype == np.float32, (name, r)
        assert np.isfinite(out).all(), (name, r)
        assert out is not own
    assert attack.craft(own * 1e38, heard, 9).dtype == np.float32  # overflow is clipped, not inf
    assert np.isfinite(attack.craft(own * 1e38, [own * 1e38], 10)).all()


def test_sign_flip_is_minus_own_scaled() -> None:
    own = vecs(1)[0]
    assert np.array_equal(make_attack("sign-flip").craft(own, [], 1), -own)
    assert np.allclose(make_attack("sign-flip:scale=4").craft(own, vecs(3), 2), -4 * own)
    assert np.allclose(make_attack("sign-flip", scale=2.5).craft(own, [], 1), -2.5 * own)


def test_gaussian_is_own_plus_seeded_noise() -> None:
    own = vecs(1)[0]
    a, b, c = (
        make_attack("gaussian", seed=3),
        make_attack("gaussian", seed=3),
        make_attack("gaussian", seed=4),
    )
    x, y, z = a.craft(own, [], 1), b.craft(own, [], 1), c.craft(own, [], 1)
    assert np.array_equal(x, y) and not np.array_equal(x, z)
    assert 0.8 < float(np.std(x - own)) < 1.2  # sigma 1
    assert not np.array_equal(a.craft(own, [], 2), x), "fresh noise every round"
    assert np.std(make_attack("gaussian:sigma=0.01").craft(own, [], 1) - own) < 0.02


def test_free_rider_echoes_a_heard_vector_and_replay_an_old_own_vector() -> None:
    own, *heard = vecs(4)
    fr = make_attack("free-rider", seed=0)
    for r in range(5):
        out = fr.craft(own, heard, r)
        assert any(np.array_equal(out, h) for h in heard)
    assert np.array_equal(fr.craft(own, [], 6), own)  # nothing heard: its own model

    history = vecs(6, seed=2)
    first = make_attack("replay")
    sent = [first.craft(v, heard, r) for r, v in enumerate(history, start=1)]
    assert all(np.array_equal(s, history[0]) for s in sent), "the first model, forever"
    lagged = Replay(lag=2)
    sent = [lagged.craft(v, heard, r) for r, v in enumerate(history, start=1)]
    assert np.array_equal(sent[0], history[0]) and np.array_equal(sent[1], history[0])
    assert all(np.array_equal(sent[t], history[t - 2]) for t in range(2, 6)), "own vector from 2 rounds ago"
    with pytest.raises(ConfigError):
        Replay(lag=0)


def test_alie_ipm_dissensus_follow_their_formulas() -> None:
    own, *heard = vecs(5, seed=4)
    stack = np.stack([own, *heard]).astype(np.float64)
    mu, sd = stack.mean(0), stack.std(0, ddof=1)
    assert np.allclose(make_attack("alie").craft(own, heard, 2), mu - 1.0 * sd, atol=1e-5)
    assert np.allclose(make_attack("alie:z=2.5").craft(own, heard, 2), mu - 2.5 * sd, atol=1e-5)
    assert np.allclose(make_attack("ipm").craft(own, heard, 2), -0.5 * mu, atol=1e-6)
    assert np.allclose(make_attack("ipm:epsilon=1").craft(own, [], 2), -own)  # own alone
    pull = (stack[1:] - stack[0]).sum(0)
    out = make_attack("dissensus").craft(own, heard, 2)
    assert np.allclose(out, own - pull, atol=1e-5)
    # dissensus points the other way from where gossip would pull its receivers
    assert float(np.dot(out - own, np.mean(heard, 0) - own)) < 0
    for name in ("alie", "dissensus"):  # nothing heard: sign flip of own
        assert np.array_equal(make_attack(name).craft(own, [], 1), -own)
    # Baruch et al.'s z for n = 16, f = 3 (s = 6 supporters): Phi^-1(10/16)
    assert alie_z(16, 3) == pytest.approx(0.3186, abs=1e-3)
    assert ALIE(z=None, n=16, f=3).z == pytest.approx(alie_z(16, 3))


def test_label_flip_poisons_the_task_through_the_honest_training_code() -> None:
    spec = TaskSpec("digits-mlp", shard=1, num_shards=4, seed=0)
    task = load_task(spec)
    attack = make_attack("label-flip")
    poisoned = attack.poison_task(task)
    assert poisoned is not task and type(poisoned) is type(task)
    assert np.array_equal(poisoned.train_labels, 9 - task.train_labels)
    assert np.array_equal(task.train_labels, load_task(spec).train_labels), "the original is untouched"
    assert torch.equal(poisoned.x_test, task.x_test) and torch.equal(poisoned.y_test, task.y_test)
    model = poisoned.build_model()
    for _ in range(15):
        poisoned.train(model)
    acc, _ = poisoned.evaluate(model)
    assert acc < 0.2, "it learnt the flipped labels"
    with torch.no_grad():
        pred = model(task.x_test).argmax(1)
    assert float((pred == 9 - task.y_test).float().mean()) > 0.6
    own = np.concatenate([v.ravel() for v in get_params(model).values()])
    assert np.array_equal(attack.craft(own, [], 1), own), "it sends its (poisoned) model as is"
    for name in ATTACKS:
        if name != "label-flip":
            assert make_attack(name).poison_task(task) is task
    with pytest.raises(ConfigError, match="label-flip"):
        attack.poison_task(object())


def test_make_attack_errors() -> None:
    with pytest.raises(
        ConfigError, match="sign-flip, gaussian, label-flip, alie, ipm, dissensus, replay, free-rider"
    ):
        make_attack("nope")
    for bad in ("alie:z", "alie:z=abc", "sign-flip:nope=1"):
        with pytest.raises(ConfigError):
            make_attack(bad)
    assert repr(make_attack("alie:z=2")) == "ALIE(z=2.0)"
    with pytest.raises(ValueError):
        make_attack("sign-flip").craft(np.zeros((2, 2), dtype=np.float32), [], 1)
