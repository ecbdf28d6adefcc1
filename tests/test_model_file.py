"""Model files: round trip, rebuilt models predict the same, nothing is ever unpickled, and every
missing, corrupt or foreign file is refused with a ModelFileError that says what it is."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pfl import checkpoint, model_file
from p2pfl.learning import TaskSpec, get_params, load_task
from p2pfl.model_file import HEADER, ModelFileError, build_model, load_model, save_model, task_meta


@pytest.fixture(scope="module")
def trained() -> tuple[object, torch.nn.Module, TaskSpec]:
    spec = TaskSpec(name="digits-mlp", hidden=(32, 16), standardize=True, lr=0.1)
    task = load_task(spec)
    model = task.build_model()
    task.train(model)
    return task, model, spec


def test_round_trip_rebuilds_the_same_model(tmp_path: Path, trained) -> None:
    task, model, spec = trained
    path = tmp_path / "model.npz"
    meta = {**task_meta(task), "round": 7, "accuracy": np.float64(0.9), "node": "hospital-a"}
    save_model(path, get_params(model), spec, meta)
    params, spec2, meta2 = load_model(path)
    assert list(params) == list(model.state_dict())
    for name, arr in get_params(model).items():
        assert np.array_equal(params[name], arr) and params[name].dtype == np.float32
    assert spec2 == spec
    assert (meta2["round"], meta2["accuracy"], meta2["node"]) == (7, 0.9, "hospital-a")
    assert meta2["features"] == 64 and meta2["num_classes"] == 10 and "time" in meta2
    assert len(meta2["feature_mean"]) == 64 and len(meta2["feature_std"]) == 64
    rebuilt = build_model(params, spec2, meta2)
    x = torch.rand(5, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    scaler = model_file.standardizer(meta2)
    assert scaler is not None and np.allclose(scaler.mean, task.standardizer.mean)
    # a standard .npz: the tensors are there by name for anyone with numpy
    with np.load(path, allow_pickle=False) as z:
        assert np.array_equal(z["0.weight"], params["0.weight"])
        assert json.loads(str(z[HEADER]))["format"] == "p2pfl-model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]  # no temporary file left behind


def test_site_paths_are_not_written(tmp_path: Path) -> None:
    spec = TaskSpec(name="logreg", data="/secret/hospital/patients.npz", test_data="/secret/t.npz")
    save_model(tmp_path / "m.npz", {"weight": np.zeros((2, 3)), "bias": np.zeros(2)}, spec, {"features": 3})
    assert b"secret" not in (tmp_path / "m.npz").read_bytes()
    _, spec2, _ = load_model(tmp_path / "m.npz")
    assert spec2.data == "" and spec2.name == "logreg"


def test_object_arrays_are_refused_never_unpickled(tmp_path: Path, trained) -> None:
    task, model, spec = trained
    good = tmp_path / "good.npz"
    save_model(good, get_params(model), spec, task_meta(task))
    with np.load(good, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    # the same file with one tensor replaced by a pickled object array
    arrays["0.bias"] = np.array([object()] * 16, dtype=object)
    bad = tmp_path / "pickled.npz"
    np.savez(bad, **arrays)
    with pytest.raises(ModelFileError, match="pickled"):
        load_model(bad)
    # and a header that is itself an object array
    arrays = {"0.weight": np.zeros(3), HEADER: np.array([{"format": "p2pfl-model"}], dtype=object)}
    np.savez(tmp_path / "pickled_header.npz", **arrays)
    with pytest.raises(ModelFileError, match="pickled"):
        load_model(tmp_path / "pickled_header.npz")


def test_missing_corrupt_and_foreign_files(tmp_path: Path, trained) -> None:
    task, model, spec = trained
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "absent.npz")
    with pytest.raises(ModelFileError, match="not a file"):
        load_model(tmp_path)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip archive")
    with pytest.raises(ModelFileError, match="not a readable"):
        load_model(junk)
    flat = tmp_path / "model.npy"
    checkpoint.atomic_save_array(flat, np.zeros(10, dtype=np.float32))
    with pytest.raises(ModelFileError, match="flat .npy vector"):
        load_model(flat)
    ckpt = tmp_path / "checkpoint.npz"
    checkpoint.save(ckpt, checkpoint.Checkpoint(round=1, seq=1, model=np.zeros(3, np.float32), spec={}))
    with pytest.raises(ModelFileError, match="checkpoint"):
        load_model(ckpt)
    data = tmp_path / "data.npz"
    np.savez(data, X=np.zeros((3, 2)), y=np.zeros(3))
    with pytest.raises(ModelFileError, match="data file"):
        load_model(data)
    # a truncated model file
    good = tmp_path / "good.npz"
    save_model(good, get_params(model), spec, task_meta(task))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelFileError):
        load_model(cut)


def _rewrite_header(src: Path, dst: Path, change) -> None:
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(str(arrays[HEADER]))
    change(header, arrays)
    arrays[HEADER] = np.array(json.dumps(header))
    np.savez(dst, **arrays)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda h, a: h.update(version=99), "version 99"),
        (lambda h, a: h.update(format="other"), "header"),
        (lambda h, a: h["tensors"].append(["extra.weight", [2]]), "listed but absent"),
        (lambda h, a: a.update({"stowaway": np.zeros(2)}), "unlisted"),
        (lambda h, a: h["tensors"][0].__setitem__(1, [1, 1]), "the header says"),
        (lambda h, a: a.update({"0.bias": np.full(32, np.nan, np.float32)}), "NaN"),
        (lambda h, a: h["task"].update(optimizer="rmsprop"), "task is not valid"),
        (lambda h, a: h.update(tensors="nope"), "tensor list is malformed"),
    ],
)
def test_inconsistent_files_are_refused(tmp_path: Path, trained, change, match: str) -> None:
    task, model, spec = trained
    good = tmp_path / "good.npz"
    save_model(good, get_params(model), spec, task_meta(task))
    bad = tmp_path / "bad.npz"
    _rewrite_header(good, bad, change)
    with pytest.raises(ModelFileError, match=match):
        load_model(bad)


def test_header_must_be_json(tmp_path: Path) -> None:
    np.savez(tmp_path / "m.npz", **{"w": np.zeros(2, np.float32), HEADER: np.array("{not json")})
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_model(tmp_path / "m.npz")


def test_save_refuses_what_it_cannot_write_safely(tmp_path: Path) -> None:
    spec = TaskSpec(name="logreg")
    path = tmp_path / "m.npz"
    with pytest.raises(ModelFileError, match="NaN"):
        save_model(path, {"weight": np.array([np.nan, 1.0])}, spec)
    with pytest.raises(ModelFileError, match="not allowed"):
        save_model(path, {HEADER: np.zeros(2)}, spec)
    with pytest.raises(ModelFileError, match="no tensors"):
        save_model(path, {}, spec)
    with pytest.raises(ModelFileError, match="JSON"):
        save_model(path, {"weight": np.zeros(2)}, spec, {"when": object()})
    with pytest.raises(ModelFileError, match="TaskSpec"):
        save_model(path, {"weight": np.zeros(2)}, {"name": "logreg"})  # type: ignore[arg-type]
    assert not path.exists()
    # an existing file is replaced whole, never half-written
    save_model(path, {"weight": np.ones(2)}, spec)
    with pytest.raises(ModelFileError):
        save_model(path, {"weight": np.array([np.inf, 0.0])}, spec)
    assert np.array_equal(load_model(path)[0]["weight"], np.ones(2))
    with pytest.raises(ModelFileError, match="cannot write"):
        save_model(tmp_path / "m.npz" / "inside", {"weight": np.ones(2)}, spec)


def test_build_model_needs_a_builtin_task_and_matching_tensors(tmp_path: Path) -> None:
    custom = TaskSpec(name="mypackage.mytask:make_task")
    with pytest.raises(ModelFileError, match="custom task"):
        build_model({"w": np.zeros(2, np.float32)}, custom, {"features": 2, "num_classes": 2})
    spec = TaskSpec(name="logreg")
    with pytest.raises(ModelFileError, match="features / classes"):
        build_model({"weight": np.zeros((2, 3), np.float32)}, spec, {})
    with pytest.raises(ModelFileError, match="do not fit"):
        build_model({"weight": np.zeros((2, 3), np.float32)}, spec, {"features": 4, "num_classes": 2})
    model = build_model(
        {"weight": np.ones((2, 3), np.float32), "bias": np.zeros(2, np.float32)},
        spec,
        {"features": 3, "num_classes": 2},
    )
    assert model(torch.ones(1, 3)).tolist() == [[3.0, 3.0]]


def test_zip_with_an_unexpected_layout(tmp_path: Path) -> None:
    path = tmp_path / "odd.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(ModelFileError):
        load_model(path)
