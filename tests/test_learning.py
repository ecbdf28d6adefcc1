"""Learning tasks: partitions, built-in tasks, user data, custom tasks, parameter plumbing, and a
4-node in-process averaging run that must reach 90% test accuracy on digits."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from p2pfl import codec, learning
from p2pfl.errors import ConfigError
from p2pfl.learning import (
    BUILTIN_TASKS,
    PartitionCache,
    TaskSpec,
    TensorTask,
    flatten,
    get_params,
    load_task,
    partition_indices,
    set_params,
    unflatten,
)
from p2pfl.learning.params import flat_view, param_views, share_one_buffer


def check_partition(shards: list[np.ndarray], n: int) -> None:
    assert all(len(s) > 0 for s in shards), "every shard non-empty"
    joined = np.concatenate(shards)
    assert len(joined) == n and len(np.unique(joined)) == n, "disjoint and covering"
    assert joined.min() == 0 and joined.max() == n - 1
    for s in shards:
        assert np.all(np.diff(s) > 0), "sorted"


# ---------------------------------------------------------------------------------------- partitions


def test_iid_partition_is_balanced_disjoint_and_covering() -> None:
    labels = np.random.default_rng(0).integers(0, 10, size=1003)
    shards = partition_indices(labels, 7, scheme="iid", alpha=0.5, seed=3)
    check_partition(shards, 1003)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_partition_is_deterministic_in_the_seed() -> None:
    labels = np.repeat(np.arange(10), 50)
    for scheme in ("iid", "dirichlet"):
        a = partition_indices(labels, 5, scheme=scheme, alpha=0.3, seed=11)
        b = partition_indices(labels, 5, scheme=scheme, alpha=0.3, seed=11)
        c = partition_indices(labels, 5, scheme=scheme, alpha=0.3, seed=12)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def _dominant_share(labels: np.ndarray, shards: list[np.ndarray]) -> float:
    """Mean over shards of the fraction of the shard's most frequent label."""
    return float(np.mean([np.bincount(labels[s]).max() / len(s) for s in shards]))


def test_dirichlet_small_alpha_is_skewed_and_valid() -> None:
    labels = np.repeat(np.arange(10), 120)
    rng = np.random.default_rng(1)
    labels = labels[rng.permutation(len(labels))]
    iid = partition_indices(labels, 8, scheme="iid", alpha=0.5, seed=0)
    skew = partition_indices(labels, 8, scheme="dirichlet", alpha=0.1, seed=0)
    mild = partition_indices(labels, 8, scheme="dirichlet", alpha=100.0, seed=0)
    for shards in (iid, skew, mild):
        check_partition(shards, len(labels))
    assert _dominant_share(labels, iid) < 0.2
    assert _dominant_share(labels, mild) < 0.25
    assert _dominant_share(labels, skew) > 0.45
    assert min(len(s) for s in skew) >= 10  # resampled until every shard has >= 10 samples


def test_dirichlet_extreme_still_gives_every_shard_samples() -> None:
    labels = np.repeat(np.arange(3), 20)  # 60 samples, 3 classes, 40 shards: forces the top-up path
    shards = partition_indices(labels, 40, scheme="dirichlet", alpha=0.01, seed=5)
    check_partition(shards, 60)
    one_each = partition_indices(np.zeros(6, dtype=int), 6, scheme="dirichlet", alpha=0.05, seed=0)
    check_partition(one_each, 6)


def test_partition_errors() -> None:
    with pytest.raises(ConfigError, match="iid, dirichlet"):
        partition_indices(np.zeros(10, dtype=int), 2, scheme="sorted", alpha=0.5, seed=0)
    with pytest.raises(ConfigError, match="non-empty"):
        partition_indices(np.zeros(3, dtype=int), 4, scheme="iid", alpha=0.5, seed=0)
    with pytest.raises(ConfigError):
        partition_indices(np.zeros(10, dtype=int), 2, scheme="dirichlet", alpha=0.0, seed=0)


# ---------------------------------------------------------------------------------------- task spec


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_shards": 0},
        {"shard": 4, "num_shards": 4},
        {"shard": -1},
        {"partition": "zipf"},
        {"alpha": 0.0},
        {"local_epochs": 0},
        {"batch_size": 0},
        {"lr": -0.1},
        {"lr": float("nan")},
    ],
)
def test_taskspec_refuses_bad_values(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        TaskSpec(**kwargs)


def test_unknown_task_lists_builtins() -> None:
    with pytest.raises(ConfigError) as err:
        load_task(TaskSpec(name="mnist-resnet"))
    for name in BUILTIN_TASKS:
        assert name in str(err.value)
    with pytest.raises(ConfigError, match="cannot import"):
        load_task(TaskSpec(name="no_such_module_p2pfl:make"))
    with pytest.raises(ConfigError, match="no callable"):
        load_task(TaskSpec(name="math:no_such_function"))


# ---------------------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_builtin_tasks_share_init_and_test_set_and_split_train(name: str) -> None:
    tasks = [load_task(TaskSpec(name=name, shard=i, num_shards=3, seed=7)) for i in range(3)]
    models = [t.build_model() for t in tasks]
    ref = flatten(get_params(models[0]))
    for m in models[1:]:
        assert np.array_equal(flatten(get_params(m)), ref), "same initial model on every node"
    other_seed = load_task(TaskSpec(name=name, seed=8)).build_model()
    assert not np.array_equal(flatten(get_params(other_seed)), ref)
    assert np.array_equal(tasks[0].y_test.numpy(), tasks[2].y_test.numpy()), "shared test split"
    total = sum(t.num_samples for t in tasks)
    whole = load_task(TaskSpec(name=name))
    assert total == whole.num_samples
    n_all = whole.num_samples + whole.num_test
    assert abs(whole.num_test - 0.25 * n_all) <= 1
    acc, loss = tasks[0].evaluate(models[0])
    assert 0.0 <= acc <= 1.0 and np.isfinite(loss)
    before = tasks[0].evaluate(models[0])[1]
    train_loss = tasks[0].train(models[0])
    assert np.isfinite(train_loss)
    for _ in range(3):
        tasks[0].train(models[0])
    assert tasks[0].evaluate(models[0])[1] < before, "local training lowers the test loss"


def test_build_model_leaves_global_rng_alone() -> None:
    task = load_task(TaskSpec())
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    task.build_model()
    assert torch.equal(torch.rand(3), expected)


def test_training_is_deterministic_per_spec() -> None:
    spec = TaskSpec(shard=1, num_shards=4, seed=2)
    results = []
    for _ in range(2):
        task = load_task(spec)
        model = task.build_model()
        losses = [task.train(model) for _ in range(2)]
        results.append((losses, flatten(get_params(model))))
    assert results[0][0] == results[1][0]
    assert np.array_equal(results[0][1], results[1][1])


def test_dirichlet_task_shards_are_skewed() -> None:
    tasks = [load_task(TaskSpec(shard=i, num_shards=5, partition="dirichlet", alpha=0.1)) for i in range(5)]
    assert all(t.num_samples > 0 for t in tasks)
    shares = [np.bincount(t.train_labels).max() / t.num_samples for t in tasks]
    assert np.mean(shares) > 0.35


# ---------------------------------------------------------------------------------------- user data


def test_user_npz_sizes_the_mlp_and_trains(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + 2 * (x[:, 2] > 0)  # 4 classes
    path = tmp_path / "data.npz"
    np.savez(path, X=x, y=y)
    tasks = [
        load_task(TaskSpec(name="digits-mlp", data=str(path), shard=i, num_shards=2, lr=0.1))
        for i in range(2)
    ]
    assert sum(t.num_samples for t in tasks) == 300 - tasks[0].num_test
    model = tasks[0].build_model()
    shapes = {k: v.shape for k, v in get_params(model).items()}
    assert shapes["0.weight"] == (64, 5) and shapes["2.weight"] == (4, 64)
    for _ in range(30):
        tasks[0].train(model)
    assert tasks[0].evaluate(model)[0] > 0.8

    logreg = load_task(TaskSpec(name="synthetic-logreg", data=str(path)))
    assert get_params(logreg.build_model())["weight"].shape == (4, 5)

    declared = tmp_path / "declared.npz"
    np.savez(declared, X=x, y=y, num_classes=np.int64(6))
    assert get_params(load_task(TaskSpec(data=str(declared))).build_model())["2.weight"].shape == (6, 64)

    img = tmp_path / "img.npz"
    np.savez(img, X=rng.random((60, 36)).astype(np.float32), y=rng.integers(0, 3, 60))
    cnn = load_task(TaskSpec(name="digits-cnn", data=str(img)))
    assert cnn.build_model()(torch.zeros(2, 36)).shape == (2, 3)
    with pytest.raises(ConfigError, match="square"):
        load_task(TaskSpec(name="digits-cnn", data=str(path)))


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"X": np.zeros((10, 3))}, "'X' and 'y'"),
        ({"X": np.zeros((10, 3)), "y": np.zeros(9, dtype=int)}, "shape"),
        ({"X": np.zeros((10, 3)), "y": np.full(10, 0.5)}, "integer"),
        ({"X": np.zeros((10, 3)), "y": -np.ones(10, dtype=int)}, ">= 0"),
        ({"X": np.full((10, 3), np.nan), "y": np.zeros(10, dtype=int)}, "NaN"),
        ({"X": np.array([[object()]] * 10, dtype=object), "y": np.zeros(10, dtype=int)}, "readable"),
        # a stray huge label would size the output layer (1e9 classes: 256 GB): refused, not allocated
        ({"X": np.zeros((10, 3)), "y": np.array([10**9] + [0] * 9)}, "label 1000000000 is too large"),
        ({"X": np.zeros((10, 3)), "y": np.array([2.0**62] + [0.0] * 9)}, "too large"),
        (
            {"X": np.zeros((10, 3)), "y": np.zeros(10, dtype=int), "num_classes": np.int64(10**9)},
            "num_classes",
        ),
        (
            {"X": np.zeros((10, 3)), "y": np.zeros(10, dtype=int), "num_classes": np.float64(3.5)},
            "single integer",
        ),
        (
            {"X": np.zeros((10, 3)), "y": np.zeros(10, dtype=int), "num_classes": np.arange(2)},
            "single integer",
        ),
        ({"X": np.full((10, 3), 1e39), "y": np.zeros(10, dtype=int)}, "too large for float32"),
        ({"X": np.zeros((10, 3)), "y": np.full(10, np.nan)}, "integer class labels"),
    ],
)
def test_user_npz_is_validated(tmp_path, arrays: dict, match: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ConfigError, match=match):
        load_task(TaskSpec(data=str(path)))


def test_user_npz_missing_or_garbage(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_task(TaskSpec(data=str(tmp_path / "absent.npz")))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(ConfigError, match="readable"):
        load_task(TaskSpec(data=str(junk)))


def test_module_function_task(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_p2pfl_task.py").write_text(
        textwrap.dedent(
            """
            from p2pfl.learning import load_task, TaskSpec
            import dataclasses

            def make(spec):
                return load_task(dataclasses.replace(spec, name="synthetic-logreg"))

            def broken(spec):
                return object()
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = load_task(TaskSpec(name="my_p2pfl_task:make", shard=1, num_shards=2))
    assert task.num_samples > 0
    assert task.build_model()(torch.zeros(1, 20)).shape == (1, 4)
    with pytest.raises(ConfigError, match="broken\\(spec\\) returned object, not a Task"):
        load_task(TaskSpec(name="my_p2pfl_task:broken"))


# ---------------------------------------------------------------------------------------- parameters


def test_get_set_params_copy_and_roundtrip() -> None:
    task = load_task(TaskSpec(name="digits-cnn"))
    model = task.build_model()
    params = get_params(model)
    assert list(params) == list(model.state_dict())
    assert all(a.dtype == np.float32 for a in params.values())
    params["conv1.weight"][...] = 5.0  # a copy: the model is untouched
    assert not torch.all(model.conv1.weight == 5.0)

    vec = flatten(params)
    assert vec.dtype == np.float32 and vec.ndim == 1
    assert vec.size == sum(p.numel() for p in model.state_dict().values())
    spec = codec.spec_of(params)
    back = unflatten(vec, spec)
    assert list(back) == list(params)
    for k in params:
        assert np.array_equal(back[k], params[k])
    assert np.shares_memory(back["fc.bias"], vec), "float32 entries are views"
    assert all(
        np.array_equal(a, b) for a, b in zip(unflatten(vec, params).values(), params.values(), strict=True)
    )

    ro = vec.copy()
    ro.flags.writeable = False  # like a zero-copy decoded buffer
    weight_ptr = model.conv1.weight.data_ptr()
    set_params(model, unflatten(ro, spec))
    assert model.conv1.weight.data_ptr() == weight_ptr, "copied into the model's own tensors"
    assert torch.all(model.conv1.weight == 5.0)
    assert np.array_equal(flatten(get_params(model)), vec)


def test_one_buffer_model_trains_the_same_and_its_vector_is_a_view() -> None:
    """share_one_buffer: the model's vector is a read-only view (no copy per round), training and
    set_params move it, and a momentum optimizer trains exactly as on the untouched model."""
    task = load_task(TaskSpec(name="digits-cnn", momentum=0.9))
    plain, shared = task.build_model(), task.build_model()
    flat = share_one_buffer(shared)
    assert flat is not None
    view = flat_view(flat)
    assert not view.flags.writeable
    assert np.array_equal(view, flatten(get_params(plain)))
    assert all(np.shares_memory(v, view) for v in param_views(shared).values())
    twin = load_task(TaskSpec(name="digits-cnn", momentum=0.9))
    task.train(plain)
    twin.train(shared)
    assert np.array_equal(flat_view(flat), flatten(get_params(plain))), "trained in place, same values"
    assert all(p.grad is None for p in shared.parameters()), "gradients dropped after training"
    set_params(shared, unflatten(np.zeros_like(view), codec.spec_of(get_params(shared))))
    assert not flat_view(flat).any()


def test_one_buffer_leaves_tied_or_mixed_models_alone() -> None:
    tied = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    ptr = tied[0].weight.data_ptr()
    assert share_one_buffer(tied) is None and tied[0].weight.data_ptr() == ptr
    mixed = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))  # an int64 counter
    assert share_one_buffer(mixed) is None
    assert share_one_buffer(torch.nn.ReLU()) is None


def test_partition_cache_gives_fresh_copies_of_the_same_shards() -> None:
    labels = np.random.default_rng(0).integers(0, 5, size=300)
    cache = PartitionCache()
    first = cache.shards(labels, 6, scheme="dirichlet", alpha=0.3, seed=2)
    first[0][:] = -1  # callers own what they get
    again = cache.shards(labels, 6, scheme="dirichlet", alpha=0.3, seed=2)
    expected = partition_indices(labels, 6, scheme="dirichlet", alpha=0.3, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(again, expected, strict=True))
    with cache.active():
        cached = load_task(TaskSpec(shard=1, num_shards=4, partition="dirichlet", seed=3))
    plain = load_task(TaskSpec(shard=1, num_shards=4, partition="dirichlet", seed=3))
    assert np.array_equal(cached.train_labels, plain.train_labels)


def test_param_errors() -> None:
    model = load_task(TaskSpec()).build_model()
    params = get_params(model)
    spec = codec.spec_of(params)
    vec = flatten(params)
    with pytest.raises(ValueError):
        unflatten(vec[:-1], spec)
    with pytest.raises(ValueError):
        unflatten(np.concatenate([vec, vec[:1]]), spec)
    with pytest.raises(ValueError, match="missing"):
        set_params(model, {k: v for k, v in params.items() if k != "0.bias"})
    bad = dict(params)
    bad["0.bias"] = np.zeros(3, dtype=np.float32)
    with pytest.raises(ValueError, match="shape"):
        set_params(model, bad)


def test_unflatten_restores_integer_buffers() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    params = get_params(model)
    spec = {k: (tuple(t.shape), t.numpy().dtype) for k, t in model.state_dict().items()}
    assert spec["1.num_batches_tracked"][1] == np.int64
    vec = flatten(params)
    vec[-1] = 2.7  # an averaged counter
    back = unflatten(vec, spec)
    assert back["1.num_batches_tracked"].dtype == np.int64 and int(back["1.num_batches_tracked"]) == 3
    set_params(model, back)
    assert int(model[1].num_batches_tracked) == 3


# ---------------------------------------------------------------------------------------- end to end


def test_four_nodes_with_averaging_reach_90_percent() -> None:
    """4 IID shards, 1 local epoch per round, full averaging (what gossip on a complete graph does)."""
    tasks = [load_task(TaskSpec(name="digits-mlp", shard=i, num_shards=4, seed=0)) for i in range(4)]
    models = [t.build_model() for t in tasks]
    spec = codec.spec_of(get_params(models[0]))
    history = []
    for _ in range(20):
        for task, model in zip(tasks, models, strict=True):
            task.train(model)
        avg = np.mean([flatten(get_params(m)) for m in models], axis=0)
        for model in models:
            set_params(model, unflatten(avg, spec))
        history.append(tasks[0].evaluate(models[0])[0])
        if len(history) >= 12 and min(history[-3:]) >= 0.9:
            break
    accs = [t.evaluate(m)[0] for t, m in zip(tasks, models, strict=True)]
    assert max(accs) - min(accs) < 1e-9, "identical models after averaging"
    assert history[-1] >= 0.90, history


# ---------------------------------------------------------------------------------------- the package


def test_spec_and_lazy_package_names_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from p2pfl.learning import PARTITION_SCHEMES, TaskSpec\n"
        "import p2pfl.learning.spec\n"
        "TaskSpec('digits-mlp', 1, 2, seed=3)\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_package_exports_every_public_name_lazily() -> None:
    for name in learning.__all__:
        assert getattr(learning, name) is not None, name
    assert learning.load_task is load_task and learning.BatchedTrainer.__module__ == "p2pfl.learning.batched"
    with pytest.raises(AttributeError):
        learning.no_such_name  # noqa: B018


def test_task_spec_fields_keep_their_order_and_settings_are_keyword_only() -> None:
    names = [f.name for f in dataclasses.fields(TaskSpec)]
    assert names[:10] == [
        "name", "shard", "num_shards", "partition", "alpha", "seed", "local_epochs", "batch_size", "lr", "data",
    ]  # fmt: skip
    spec = TaskSpec("digits-cnn", 1, 3, lr=0.1, seed=5)
    assert (spec.name, spec.shard, spec.num_shards, spec.lr, spec.seed) == ("digits-cnn", 1, 3, 0.1, 5)
    assert spec.task_settings() == {
        "partition": "iid", "alpha": 0.5, "seed": 5, "local_epochs": 1, "batch_size": 32, "lr": 0.1, "data": "",
    }  # fmt: skip
    # the own-data and optimizer keys default to the earlier behaviour: plain SGD, constant rate
    assert spec.plain_sgd and spec.test_fraction == 0.25 and spec.num_classes == 0 and not spec.standardize
    assert hash(TaskSpec(features=["a", "b"], data="x.csv")) is not None  # lists become tuples
    with pytest.raises(TypeError):
        TaskSpec("digits-cnn", 1, 3, "iid")  # type: ignore[misc]


def test_tensor_task_public_accessors() -> None:
    spec = TaskSpec(shard=1, num_shards=3, seed=4, batch_size=64)
    task = load_task(spec)
    assert isinstance(task, TensorTask)
    assert task.x_train.dtype == torch.float32 and task.x_train.shape == (task.num_samples, 64)
    assert task.y_train.dtype == torch.int64 and np.array_equal(task.y_train.numpy(), task.train_labels)
    assert task.x_test.shape == (task.num_test, 64) and task.y_test.shape == (task.num_test,)
    # the generator is the one train() draws its minibatch order from
    twin = load_task(spec)
    first = torch.randperm(task.num_samples, generator=task.generator)
    assert torch.equal(first, torch.randperm(twin.num_samples, generator=twin.generator))
    # relabelled copy: own labels, shared features, test split and generator; original untouched
    flipped = task.with_train_labels(9 - task.train_labels)
    assert type(flipped) is TensorTask and flipped is not task
    assert np.array_equal(flipped.train_labels, 9 - task.train_labels)
    assert np.array_equal(task.train_labels, twin.train_labels)
    assert flipped.x_train is task.x_train and flipped.generator is task.generator
    with pytest.raises(ValueError):
        task.with_train_labels(task.train_labels[:-1])
    # test split sharing: equal splits share one tensor, different ones are left alone
    other = load_task(TaskSpec(shard=2, num_shards=3, seed=4))
    assert isinstance(other, TensorTask)
    assert other.same_test_split(task) and other.x_test is not task.x_test
    assert other.share_test_split(task) and other.x_test is task.x_test and other.y_test is task.y_test
    synthetic = load_task(TaskSpec(name="synthetic-logreg"))
    assert isinstance(synthetic, TensorTask)
    assert not synthetic.same_test_split(task) and not synthetic.share_test_split(task)


# ------------------------------------------------------------------------ optimizers and schedules


@pytest.mark.parametrize(
    "settings",
    [
        {"optimizer": "sgd", "lr": 0.05},
        {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
        {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "optimizer_state": "reset"},
        {"optimizer": "adam", "lr": 0.01},
        {"optimizer": "adam", "lr": 0.01, "weight_decay": 1e-4},
        {"optimizer": "sgd", "lr": 0.05, "lr_schedule": "step", "lr_step_rounds": 2, "lr_gamma": 0.5},
        {"optimizer": "adam", "lr": 0.01, "lr_schedule": "cosine", "lr_rounds": 5, "lr_min": 0.001},
    ],
    ids=lambda s: "-".join(str(v) for v in s.values()),
)
def test_each_optimizer_and_schedule_lowers_the_loss(settings: dict) -> None:
    task = load_task(TaskSpec(name="synthetic-logreg", batch_size=64, **settings))
    model = task.build_model()
    with torch.no_grad():
        model.weight.mul_(0.0)  # a start far from the optimum, the same for every optimizer
    first = task.evaluate(model)[1]
    losses = [task.train(model) for _ in range(5)]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] and task.evaluate(model)[1] < first


def test_learning_rate_schedules_over_rounds() -> None:
    step = TaskSpec(lr=0.4, lr_schedule="step", lr_step_rounds=3, lr_gamma=0.5)
    assert [step.lr_at(r) for r in range(1, 9)] == [0.4, 0.4, 0.4, 0.2, 0.2, 0.2, 0.1, 0.1]
    cos = TaskSpec(lr=0.3, lr_schedule="cosine", lr_rounds=10, lr_min=0.01)
    rates = [cos.lr_at(r) for r in range(1, 15)]
    assert (
        rates[0] == pytest.approx(0.3)
        and rates[10] == pytest.approx(0.01)
        and rates[-1] == pytest.approx(0.01)
    )
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
    assert TaskSpec(lr=0.3).lr_at(100) == 0.3
    # the task follows the rounds it trains, or the round the node tells it (resume, catch-up)
    task = load_task(
        TaskSpec(name="synthetic-logreg", lr=0.4, lr_schedule="step", lr_step_rounds=1, lr_gamma=0.5)
    )
    assert isinstance(task, TensorTask)
    model = task.build_model()
    assert task.lr() == 0.4
    task.train(model)
    task.train(model)
    assert task.next_round == 3 and task.lr() == pytest.approx(0.1)
    task.set_round(1)
    assert task.lr() == 0.4
    opt = task._optimizers[model]
    task.train(model)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4)
    with pytest.raises(ConfigError, match="lr_rounds"):
        load_task(TaskSpec(name="synthetic-logreg", lr_schedule="cosine"))


def test_optimizer_state_survives_mixing_or_is_reset() -> None:
    """keep: momentum buffers / Adam moments stay with the model object across rounds, also when
    mixing overwrites the weights in place (set_params); reset: a fresh optimizer every round."""
    kept = load_task(TaskSpec(name="synthetic-logreg", optimizer="adam", lr=0.01))
    assert isinstance(kept, TensorTask)
    model = kept.build_model()
    kept.train(model)
    opt = kept._optimizers[model]
    steps = int(opt.state[model.weight]["step"])
    mixed = {k: v * 0.5 for k, v in get_params(model).items()}  # what a gossip round does to the weights
    set_params(model, mixed)
    kept.train(model)
    assert kept._optimizers[model] is opt and int(opt.state[model.weight]["step"]) == 2 * steps
    kept.reset_optimizer(model)
    assert model not in kept._optimizers
    other = kept.build_model()  # another model (another simulated node) gets its own state
    kept.train(other)
    assert kept._optimizers[other] is not kept._optimizers.get(model)

    reset = load_task(TaskSpec(name="synthetic-logreg", momentum=0.9, lr=0.05, optimizer_state="reset"))
    assert isinstance(reset, TensorTask)
    m = reset.build_model()
    reset.train(m)
    assert m not in reset._optimizers


def test_default_training_is_unchanged_plain_sgd() -> None:
    """The defaults train exactly as before the optimizers came: SGD, constant rate, no momentum."""
    spec = TaskSpec(name="synthetic-logreg", seed=3)
    task = load_task(spec)
    model = task.build_model()
    ref = copy.deepcopy(model)
    task.train(model)
    twin = load_task(spec)
    opt = torch.optim.SGD(ref.parameters(), lr=spec.lr)
    gen = twin.generator
    for _ in range(spec.local_epochs):
        perm = torch.randperm(twin.num_samples, generator=gen)
        for start in range(0, twin.num_samples, spec.batch_size):
            idx = perm[start : start + spec.batch_size]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ref(twin.x_train[idx]), twin.y_train[idx]).backward()
            opt.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a, b)


def test_only_plain_sgd_is_batched() -> None:
    plain = [load_task(TaskSpec(name="synthetic-logreg", shard=i, num_shards=2)) for i in range(2)]
    model = plain[0].build_model()
    assert learning.batchable(plain, model)
    adam = [
        load_task(TaskSpec(name="synthetic-logreg", shard=i, num_shards=2, optimizer="adam", lr=0.01))
        for i in range(2)
    ]
    assert not learning.batchable(adam, model)


def test_hidden_layers_of_the_mlp() -> None:
    task = load_task(TaskSpec(name="mlp", hidden=(32, 16)))
    shapes = {k: tuple(v.shape) for k, v in get_params(task.build_model()).items()}
    assert shapes == {
        "0.weight": (32, 64), "0.bias": (32,), "2.weight": (16, 32), "2.bias": (16,),
        "4.weight": (10, 16), "4.bias": (10,),
    }  # fmt: skip
    # the default keeps the old model and initial weights
    old = get_params(load_task(TaskSpec(name="digits-mlp")).build_model())
    new = get_params(load_task(TaskSpec(name="mlp")).build_model())
    assert all(np.array_equal(old[k], new[k]) for k in old)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"optimizer": "rmsprop"}, r"\[task\] optimizer must be one of sgd, adam"),
        ({"optimizer": "adam"}, r"lr = 0.3 is too large for optimizer = adam; set \[task\] lr"),
        ({"optimizer": "adam", "lr": 0.01, "momentum": 0.9}, "momentum applies to optimizer = sgd"),
        ({"momentum": 1.0}, r"\[task\] momentum must be 0 <= momentum < 1"),
        ({"weight_decay": -1.0}, r"\[task\] weight_decay"),
        ({"optimizer_state": "sometimes"}, r"\[task\] optimizer_state must be one of keep, reset"),
        ({"lr_schedule": "linear"}, r"\[task\] lr_schedule must be one of constant, step, cosine"),
        ({"lr_step_rounds": 0}, r"\[task\] lr_step_rounds must be an integer >= 1"),
        ({"lr_gamma": 0.0}, r"\[task\] lr_gamma"),
        ({"lr_min": 1.0}, r"\[task\] lr_min must be 0 <= lr_min <= lr"),
        ({"lr_rounds": -1}, r"\[task\] lr_rounds"),
        ({"test_fraction": 1.0}, r"\[task\] test_fraction must be a number between 0 and 1"),
        ({"test_data": "t.csv"}, r"\[task\] test_data needs \[task\] data"),
        ({"num_classes": 1}, r"\[task\] num_classes must be 0 .*or 2.."),
        ({"class_names": ("a",)}, "at least 2 classes"),
        ({"class_names": ("a", "b"), "num_classes": 3}, "num_classes = 3 but class_names lists 2"),
        ({"features": ("a", "a")}, r"features lists \['a'\] more than once"),
        ({"features": ("label",), "data": "x.csv"}, "must not include the label column"),
        ({"label_column": " "}, "label_column must name the CSV column"),
        ({"hidden": ()}, r"\[task\] hidden must list 1..8 layer widths"),
        ({"hidden": (0,)}, r"\[task\] hidden"),
        ({"standardize": "yes"}, "standardize must be true or false"),
    ],
)
def test_new_task_keys_are_validated_with_the_key_and_fix(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TaskSpec(**kwargs)
