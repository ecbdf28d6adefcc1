"""A hospital's own data: CSV by column name, the test split or a test file, declared classes (a
site missing one still builds the federation's model), standardisation, the label histogram, and
the evaluate / predict / export commands on CSV files, where every bad input is one `error:` line
and exit status 2."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_wine

from p2pfl import model_cli
from p2pfl.errors import ConfigError
from p2pfl.learning import TaskSpec, get_params, load_task, read_table
from p2pfl.model_file import load_model, save_model, task_meta


def write_csv(path: Path, header: list[str], rows: list[list[object]], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def wine_csv(path: Path, *, drop_class: int | None = None, shuffle_columns: bool = False) -> Path:
    """sklearn's wine data (13 raw-scale features, 3 classes) as a hospital would export it: an id
    column, named features, a text-free integer label column called `outcome`."""
    d = load_wine()
    names = [n.replace("/", "_") for n in d.feature_names]
    keep = d.target != drop_class if drop_class is not None else np.ones(len(d.target), bool)
    header = ["patient_id", *names, "outcome"]
    rows = [
        [i, *x.tolist(), int(y)] for i, (x, y) in enumerate(zip(d.data[keep], d.target[keep], strict=True))
    ]
    if shuffle_columns:
        order = [0, len(header) - 1, *range(len(header) - 2, 0, -1)]
        header = [header[i] for i in order]
        rows = [[r[i] for i in order] for r in rows]
    return write_csv(path, header, rows)


# ------------------------------------------------------------------------------------------ loading


def test_csv_loads_by_column_name(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "site.csv",
        ["id", "age", "label", "bp"],
        [[1, 50, 0, 120], [2, 61, 1, 140], [3, 45, 1, 130], [4, 70, 0, 150]],
    )
    table = read_table(path)
    assert table.feature_names == ("id", "age", "bp")
    assert table.x.dtype == np.float32 and table.x[1].tolist() == [2, 61, 140]
    assert table.y is not None and table.y.tolist() == [0, 1, 1, 0]
    chosen = read_table(path, features=["bp", "age"])
    assert chosen.feature_names == ("bp", "age") and chosen.x[0].tolist() == [120, 50]
    assert chosen.ignored_columns == ("id",)
    # semicolons (spreadsheets in many locales), a byte-order mark and a blank last line
    semi = tmp_path / "semi.csv"
    semi.write_text("\ufeffage;label\n1.5;0\n2.5;1\n\n", encoding="utf-8")
    t = read_table(semi)
    assert t.feature_names == ("age",) and t.x[:, 0].tolist() == [1.5, 2.5]
    # labels optional (predict), or by class name
    assert read_table(path, labels=False).y is None
    named = write_csv(tmp_path / "named.csv", ["x", "label"], [[1, "benign"], [2, "malignant"], [3, "1"]])
    assert read_table(named, class_names=["benign", "malignant"]).y.tolist() == [0, 1, 1]


@pytest.mark.parametrize(
    "header, rows, kwargs, match",
    [
        (["age", "outcome"], [[1, 0]], {}, "no label column 'label'.*label_column"),
        (["age", "label"], [[1, 0], [2]], {}, "line 3: 1 values, but the header has 2"),
        (["age", "label"], [[1, 0], ["", 1]], {}, "line 3, column 'age': empty value; missing values"),
        (["age", "label"], [[1, 0], ["old", 1]], {}, "column 'age': 'old' is not a number"),
        (["age", "label"], [[1, 0], [2, "sick"]], {}, "label 'sick' is not a class index.*class_names"),
        (["age", "label"], [[1, 0], [2, 0.5]], {}, "label '0.5' is not"),
        (["age", "label"], [[1, 0], [2, -1]], {}, "label '-1'"),
        (["age", "age", "label"], [[1, 2, 0]], {}, "appear more than once"),
        (["age", "", "label"], [[1, 2, 0]], {}, "column 2 has no name"),
        (["age", "label"], [], {}, "no data rows"),
        (["age", "label"], [[1, 0]], {"features": ["age", "weight"]}, "lacks feature column\\(s\\) 'weight'"),
        (["label"], [[1]], {}, "no feature columns"),
        (["age", "label"], [[1e39, 0]], {}, "line 2, column 'age': '1e\\+39' is infinite or too large"),
        (
            ["age", "label"],
            [[1, 0], ["nan", 1]],
            {},
            "line 3, column 'age': missing value 'nan'; missing values",
        ),
        (["age", "label"], [[1, 0], ["NA", 1]], {}, "line 3, column 'age': missing value 'NA'"),
        (["age", "label"], [["inf", 0]], {}, "'inf' is infinite"),
    ],
)
def test_csv_mistakes_name_the_line_column_and_fix(
    tmp_path: Path, header: list[str], rows: list[list[object]], kwargs: dict, match: str
) -> None:
    path = write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(ConfigError, match=match):
        read_table(path, **kwargs)


def test_unusable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        read_table(tmp_path / "absent.csv")
    (tmp_path / "data.xlsx").write_bytes(b"PK")
    with pytest.raises(ConfigError, match=".csv .*or .npz"):
        read_table(tmp_path / "data.xlsx")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ConfigError, match="empty; it needs a header row"):
        read_table(tmp_path / "empty.csv")
    (tmp_path / "latin.csv").write_bytes("âge,label\n1,0\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_table(tmp_path / "latin.csv")


# ------------------------------------------------------------------------------- classes and splits


def test_site_missing_a_class_builds_the_federations_model(tmp_path: Path, caplog) -> None:
    full = wine_csv(tmp_path / "a.csv")
    partial = wine_csv(tmp_path / "b.csv", drop_class=2)
    base = {"name": "mlp", "label_column": "outcome", "features": (), "num_classes": 3, "standardize": True}
    with caplog.at_level(logging.INFO, logger="p2pfl.learning"):
        a = load_task(TaskSpec(data=str(full), **base))
        b = load_task(TaskSpec(data=str(partial), **base))
    shapes_a = {k: v.shape for k, v in get_params(a.build_model()).items()}
    shapes_b = {k: v.shape for k, v in get_params(b.build_model()).items()}
    assert shapes_a == shapes_b and shapes_b["2.weight"] == (3, 64)
    hist = b.label_histogram()
    assert hist["train"][2] == 0 and hist["train"][0] > 0
    text = caplog.text
    assert "training examples per class: 0: " in text and "no training examples of class(es) 2" in text
    assert "num_classes is not set" not in text
    # without the declaration, the shapes differ, and the log says to declare it
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="p2pfl.learning"):
        inferred = load_task(TaskSpec(data=str(partial), **{**base, "num_classes": 0}))
    assert inferred.num_classes == 2 and "num_classes is not set" in caplog.text


def test_labels_outside_the_declared_classes_are_refused(tmp_path: Path) -> None:
    path = wine_csv(tmp_path / "site.csv")
    with pytest.raises(
        ConfigError, match=r"label\(s\) \[2\] .* outside 0..1 .*num_classes = 2.*raise num_classes"
    ):
        load_task(TaskSpec(name="mlp", data=str(path), label_column="outcome", num_classes=2))
    npz = tmp_path / "site.npz"
    np.savez(npz, X=np.zeros((10, 3)), y=np.arange(10) % 3, num_classes=np.int64(4))
    with pytest.raises(ConfigError, match="file declares num_classes = 4 but \\[task\\] num_classes = 5"):
        load_task(TaskSpec(name="mlp", data=str(npz), num_classes=5))
    assert load_task(TaskSpec(name="mlp", data=str(npz), num_classes=4)).num_classes == 4
    with pytest.raises(ConfigError, match="built-in data of 'digits-mlp' has 10 classes"):
        load_task(TaskSpec(name="digits-mlp", num_classes=3))


def test_builtin_tasks_log_their_label_histogram_and_test_size(caplog) -> None:
    """Every node logs its shard's examples per class and the test split size before round 1, not
    only own-data sites; a process loading many shards at once (the simulator) keeps it at debug."""
    from p2pfl.learning import PartitionCache

    with caplog.at_level(logging.INFO, logger="p2pfl.learning"):
        task = load_task(TaskSpec("digits-mlp", 1, 4))
    line = next(r.getMessage() for r in caplog.records if "examples per class" in r.getMessage())
    hist = task.label_histogram()["train"]  # type: ignore[attr-defined]
    assert line.startswith("digits-mlp shard 1/4: 64 features, 10 classes")
    assert f"0: {hist[0]}, 1: {hist[1]}" in line and f"; {task.num_test} test examples" in line  # type: ignore[attr-defined]
    assert "num_classes is not set" not in caplog.text  # built-in data: the class count is known
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="p2pfl.learning"), PartitionCache().active():
        load_task(TaskSpec("digits-mlp", 2, 4))
    assert "examples per class" not in caplog.text


@pytest.mark.slow
def test_a_class_count_mismatch_stops_the_node_before_round_1(tmp_path: Path) -> None:
    """A site whose labels do not fit the federation's [task] num_classes stops at start, through the
    real command, with one error line saying what to set; no round runs, no model is saved."""
    from test_bad_input import assert_one_line_error, certified_dir, run_cli, write_config

    data = wine_csv(tmp_path / "site.csv")  # classes 0, 1, 2
    node_dir = certified_dir(tmp_path)
    task = {
        "name": "mlp",
        "data": str(data),
        "label_column": "outcome",
        "num_classes": 2,
        "standardize": True,
    }
    path = write_config(tmp_path / "node.toml", node_dir, task=task)
    out = run_cli("node", "--config", str(path), cwd=tmp_path)
    assert_one_line_error(out, "label(s) [2]", "[task] num_classes = 2", "raise num_classes")
    assert not (node_dir / "metrics.jsonl").exists() and not (node_dir / "model.npz").exists()


def test_test_fraction_and_separate_test_file(tmp_path: Path) -> None:
    path = wine_csv(tmp_path / "site.csv")
    n = 178
    quarter = load_task(TaskSpec(name="mlp", data=str(path), label_column="outcome"))
    tenth = load_task(TaskSpec(name="mlp", data=str(path), label_column="outcome", test_fraction=0.1))
    assert quarter.num_test == round(0.25 * n) and tenth.num_test == round(0.1 * n)
    assert tenth.num_samples == n - tenth.num_test
    # a separate test file, its columns in another order: matched by name
    test = wine_csv(tmp_path / "test.csv", shuffle_columns=True)
    task = load_task(TaskSpec(name="mlp", data=str(path), test_data=str(test), label_column="outcome"))
    assert task.num_samples == n and task.num_test == n
    assert torch.equal(task.x_train, task.x_test)  # same rows, same column order after matching
    short = write_csv(tmp_path / "short.csv", ["alcohol", "outcome"], [[13.0, 0]])
    with pytest.raises(ConfigError, match="test_data .*lacks feature column"):
        load_task(TaskSpec(name="mlp", data=str(path), test_data=str(short), label_column="outcome"))


def test_standardisation_uses_the_training_shard(tmp_path: Path) -> None:
    path = wine_csv(tmp_path / "site.csv")
    spec = TaskSpec(name="mlp", data=str(path), label_column="outcome", features=("alcohol", "proline"))
    raw = load_task(spec)
    scaled = load_task(TaskSpec(**{**spec.__dict__, "standardize": True}))
    x = scaled.x_train.numpy()
    assert np.allclose(x.mean(0), 0, atol=1e-5) and np.allclose(x.std(0), 1, atol=1e-4)
    assert raw.x_train.numpy()[:, 1].max() > 1000  # proline is in the thousands
    mean, std = scaled.standardizer.mean, scaled.standardizer.std
    assert np.allclose(scaled.x_test.numpy(), (raw.x_test.numpy() - mean) / std, atol=1e-5)
    # a constant column is centred, not divided by zero
    const = write_csv(tmp_path / "const.csv", ["a", "b", "label"], [[1, i, i % 2] for i in range(20)])
    t = load_task(TaskSpec(name="logreg", data=str(const), standardize=True))
    assert np.all(np.isfinite(t.x_train.numpy())) and np.all(t.x_train.numpy()[:, 0] == 0)


def test_raw_features_train_with_standardisation(tmp_path: Path) -> None:
    """Raw wine features (proline ~1000) drove plain SGD to a constant predictor; standardised, the
    same model and rate learn (behaviour, not timing)."""
    path = wine_csv(tmp_path / "site.csv")
    spec = TaskSpec(
        name="mlp", data=str(path), label_column="outcome", num_classes=3, lr=0.1, standardize=True
    )
    task = load_task(spec)
    model = task.build_model()
    for _ in range(15):
        task.train(model)
    accuracy, _ = task.evaluate(model)
    assert accuracy > 0.85


# ------------------------------------------------------------------------------------ the commands


@pytest.fixture(scope="module")
def cancer_model(tmp_path_factory) -> tuple[Path, Path]:
    """A model trained on breast-cancer CSV data with text labels and standardisation, saved as the
    node would save it, and the CSV."""
    tmp = tmp_path_factory.mktemp("cancer")
    d = load_breast_cancer()
    names = [n.replace(" ", "_") for n in d.feature_names]
    rows = [
        [i, *x.tolist(), d.target_names[y]] for i, (x, y) in enumerate(zip(d.data, d.target, strict=True))
    ]
    data = write_csv(tmp / "site.csv", ["patient_id", *names, "diagnosis"], rows)
    spec = TaskSpec(
        name="mlp",
        data=str(data),
        label_column="diagnosis",
        class_names=("malignant", "benign"),
        features=tuple(names),
        standardize=True,
        optimizer="adam",
        lr=0.01,
    )
    task = load_task(spec)
    model = task.build_model()
    for _ in range(5):
        task.train(model)
    accuracy, _ = task.evaluate(model)
    path = tmp / "model.npz"
    save_model(
        path, get_params(model), spec, {**task_meta(task), "round": 5, "accuracy": accuracy, "node": "a"}
    )
    return path, data


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = model_cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_evaluate_prints_accuracy_loss_and_confusion(cancer_model, capsys) -> None:
    model, data = cancer_model
    code, out, _ = run(["evaluate", str(model), str(data)], capsys)
    assert code == 0
    assert "accuracy 0.9" in out and "loss" in out and "confusion matrix" in out and "malignant" in out
    code, out, _ = run(["evaluate", str(model), str(data), "--json"], capsys)
    result = json.loads(out)
    assert result["rows"] == 569 and result["accuracy"] > 0.9 and result["classes"] == ["malignant", "benign"]
    assert np.array(result["confusion"]).sum() == 569


def test_predict_writes_a_class_per_row(cancer_model, tmp_path: Path, capsys) -> None:
    model, data = cancer_model
    out_csv = tmp_path / "pred.csv"
    code, _, err = run(["predict", str(model), str(data), "--out", str(out_csv), "--probabilities"], capsys)
    assert code == 0 and "wrote 569 predictions" in err
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 569 and set(rows[0]) == {"row", "predicted", "prob_malignant", "prob_benign"}
    assert {r["predicted"] for r in rows} <= {"malignant", "benign"}
    assert abs(float(rows[0]["prob_malignant"]) + float(rows[0]["prob_benign"]) - 1) < 1e-5
    truth = [r[-1] for r in csv.reader(data.open())][1:]
    assert np.mean([p["predicted"] == t for p, t in zip(rows, truth, strict=True)]) > 0.9
    # unlabelled rows with the columns in another order, to standard output
    with data.open() as fh:
        table = list(csv.reader(fh))
    header = table[0][1:-1][::-1]
    rows_in = [r[1:-1][::-1] for r in table[1:4]]
    unlabelled = write_csv(tmp_path / "new_patients.csv", header, rows_in)
    code, out, _ = run(["predict", str(model), str(unlabelled)], capsys)
    lines = out.strip().splitlines()
    assert code == 0 and lines[0] == "row,predicted" and len(lines) == 4
    assert [line.split(",")[1] for line in lines[1:]] == [rows[i]["predicted"] for i in range(3)]


def test_bad_inputs_end_in_one_error_line_and_status_2(cancer_model, tmp_path: Path, capsys) -> None:
    model, data = cancer_model
    wrong_cols = write_csv(tmp_path / "wrong.csv", ["a", "b", "diagnosis"], [[1, 2, "benign"]])
    narrow = tmp_path / "narrow.npz"
    np.savez(narrow, X=np.zeros((3, 5)), y=np.zeros(3, dtype=int))
    outside = tmp_path / "outside.npz"
    np.savez(outside, X=np.zeros((3, 30)), y=np.array([0, 1, 7]))
    cases = [
        (["evaluate", str(tmp_path / "absent.npz"), str(data)], "not found"),
        (["evaluate", str(model), str(tmp_path / "absent.csv")], "no such file"),
        (["evaluate", str(data), str(data)], "not a readable .npz model file"),
        (["evaluate", str(model), str(wrong_cols)], "lacks feature column"),
        (["evaluate", str(model), str(narrow)], "has 5 feature columns but the model takes 30"),
        (["evaluate", str(model), str(outside)], r"label\(s\) \[7\] are outside the model's classes 0..1"),
        (["evaluate", str(model), str(data), "--label-column", "outcome"], "no label column 'outcome'"),
        (["predict", str(model), str(wrong_cols)], "lacks feature column"),
        (["predict", str(model), str(data), "--out", str(tmp_path / "no" / "dir.csv")], "does not exist"),
        (["export", str(model), "--out", str(tmp_path)], "is a directory"),
        (["export", str(tmp_path / "absent.npz"), "--out", str(tmp_path / "x.pt")], "not found"),
    ]
    for argv, match in cases:
        code, out, err = run(argv, capsys)
        lines = [line for line in err.splitlines() if not line.startswith("note:")]
        assert code == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        assert re.search(match, lines[0]), (argv, lines[0])
        assert "Traceback" not in err


def test_export_formats(cancer_model, tmp_path: Path, capsys) -> None:
    model, _ = cancer_model
    code, _, _ = run(["export", str(model), "--out", str(tmp_path / "copy.npz")], capsys)
    assert code == 0
    params, spec, meta = load_model(tmp_path / "copy.npz")
    assert spec.class_names == ("malignant", "benign") and meta["exported_from"] == str(model)
    code, out, _ = run(
        ["export", str(model), "--out", str(tmp_path / "m.pt"), "--format", "pt-state-dict"], capsys
    )
    assert code == 0 and "weights_only=True" in out and "standardised" in out
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert list(state) == list(params) and torch.equal(
        state["0.weight"], torch.from_numpy(params["0.weight"])
    )
    code, out, err = run(
        ["export", str(model), "--out", str(tmp_path / "m.onnx"), "--format", "onnx"], capsys
    )
    try:
        import onnx  # noqa: F401
    except ImportError:
        assert code == 2 and err.strip().startswith("error: --format onnx needs the onnx package")
    else:
        assert code == 0 and (tmp_path / "m.onnx").stat().st_size > 0


def test_commands_register_on_another_parser() -> None:
    """cli.build_parser adds them with one line: model_cli.add_commands(sub)."""
    parser = argparse.ArgumentParser(prog="p2pfl")
    sub = parser.add_subparsers(dest="command", required=True)
    model_cli.add_commands(sub)
    args = parser.parse_args(["predict", "m.npz", "d.csv", "--probabilities"])
    assert args.func is model_cli.predict_command and args.probabilities and args.out is None
    assert parser.parse_args(["export", "m.npz", "--out", "x"]).format == "npz"
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "m.npz", "--out", "x", "--format", "pickle"])


# ------------------------------------------------------------ shared standardisation (p2pfl stats)


def test_shared_feature_statistics_scale_every_site_alike(tmp_path: Path, capsys) -> None:
    """Each site summarises its features (no rows leave it), the summaries are combined exactly, and
    every site that points [task] feature_stats at the result scales its inputs the same way."""
    d = load_wine()
    names = [n.replace("/", "_") for n in d.feature_names]
    halves = []
    for k, rows in enumerate((d.data[:90], d.data[90:])):
        labels = d.target[:90] if k == 0 else d.target[90:]
        halves.append(
            write_csv(
                tmp_path / f"site{k}.csv",
                [*names, "label"],
                [[*x, y] for x, y in zip(rows, labels, strict=True)],
            )
        )
    for k, path in enumerate(halves):
        code, out, _ = run(["stats", str(path), "--out", str(tmp_path / f"site{k}.json")], capsys)
        assert code == 0 and "statistics of" in out
    code, _, _ = run(
        [
            "stats",
            str(tmp_path / "site0.json"),
            str(tmp_path / "site1.json"),
            "--out",
            str(tmp_path / "fed.json"),
        ],
        capsys,
    )
    assert code == 0
    fed = json.loads((tmp_path / "fed.json").read_text())
    assert fed["count"] == 178 and fed["features"] == names
    assert np.allclose(fed["mean"], d.data.mean(0)) and np.allclose(
        np.sqrt(np.array(fed["m2"]) / 178), d.data.std(0)
    )
    tasks = [
        load_task(
            TaskSpec(
                name="mlp",
                data=str(p),
                standardize=True,
                feature_stats=str(tmp_path / "fed.json"),
                num_classes=3,
            )
        )
        for p in halves
    ]
    assert np.array_equal(tasks[0].standardizer.mean, tasks[1].standardizer.mean)
    assert np.allclose(tasks[0].standardizer.mean, d.data.mean(0), rtol=1e-5)
    both = np.concatenate([t.x_train.numpy() for t in tasks] + [t.x_test.numpy() for t in tasks])
    assert np.allclose(both.mean(0), 0, atol=1e-4) and np.allclose(both.std(0), 1, atol=1e-4)
    # the model file carries them, so evaluate / predict scale the same way
    assert task_meta(tasks[1])["feature_mean"] == task_meta(tasks[0])["feature_mean"]
    # mismatches are refused with the fix
    other = write_csv(tmp_path / "other.csv", ["a", "b", "label"], [[1, 2, 0], [3, 4, 1]])
    with pytest.raises(ConfigError, match="statistics of 13 features; this data has 2"):
        load_task(
            TaskSpec(name="mlp", data=str(other), standardize=True, feature_stats=str(tmp_path / "fed.json"))
        )
    renamed = write_csv(
        tmp_path / "renamed.csv",
        [*reversed(names), "label"],
        [[*x[::-1], y] for x, y in zip(d.data, d.target, strict=True)],
    )
    with pytest.raises(ConfigError, match="same columns in the same order"):
        load_task(
            TaskSpec(
                name="mlp", data=str(renamed), standardize=True, feature_stats=str(tmp_path / "fed.json")
            )
        )
    with pytest.raises(ConfigError, match="set \\[task\\] standardize = true"):
        TaskSpec(feature_stats="fed.json")
    code, _, err = run(
        ["stats", str(tmp_path / "site0.json"), str(other), "--out", str(tmp_path / "x.json")], capsys
    )
    assert code == 2 and err.startswith("error: stats: the parts name different features")
    code, _, err = run(["stats", str(tmp_path / "nope.json"), "--out", str(tmp_path / "x.json")], capsys)
    assert code == 2 and "not found" in err


# ------------------------------------------------------------------------ hospitals in a federation


@pytest.mark.timeout(240)
def test_hospitals_with_own_csv_files_train_one_model_together(tmp_path: Path) -> None:
    """Three nodes over the in-memory mesh, each with its own CSV file of raw-scale features; one
    site has no examples of class 2. With num_classes declared every site builds the same model, so
    no update is refused (before, the short site's model had another shape and every update was);
    the model file of the result evaluates on a CSV."""
    import asyncio

    from helpers import certify
    from memory_mesh import Hub

    from p2pfl.config import NodeConfig, validate
    from p2pfl.federation import FederationAuthority
    from p2pfl.metrics import read_jsonl
    from p2pfl.node import Node

    d = load_wine()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(d.target))
    names = [n.replace("/", "_") for n in d.feature_names]
    sites = []
    for i, part in enumerate(np.array_split(order, 3)):
        if i == 2:
            part = part[d.target[part] != 2]  # this hospital never saw class 2
        rows = [[*d.data[j].tolist(), int(d.target[j])] for j in part]
        sites.append(write_csv(tmp_path / f"site{i}.csv", [*names, "label"], rows))
    # shared scaling: each site's summary, combined (a site missing a class has shifted statistics)
    summaries = []
    for i, data in enumerate(sites):
        summaries.append(str(tmp_path / f"site{i}.json"))
        assert model_cli.main(["stats", str(data), "--out", summaries[-1]]) == 0
    assert model_cli.main(["stats", *summaries, "--out", str(tmp_path / "fed.json")]) == 0
    hub, authority, nodes = Hub(), FederationAuthority.create(tmp_path / "federation"), []
    for i, data in enumerate(sites):
        cfg = NodeConfig()
        cfg.node.name, cfg.node.data_dir = f"hospital-{i}", str(tmp_path / f"n{i}")
        cfg.discovery.expect_peers, cfg.discovery.wait_s = 2, 120.0
        cfg.task = TaskSpec(
            name="mlp", data=str(data), num_classes=3, standardize=True, feature_stats=str(tmp_path / "fed.json"),
            optimizer="adam", lr=0.02, local_epochs=3, lr_schedule="cosine", test_fraction=0.3,
        )  # fmt: skip
        cfg.training.rounds = 8
        cfg.gossip.topology, cfg.gossip.rule = "full", "mean"
        cfg.gossip.round_timeout_s, cfg.gossip.linger_s = 300.0, 0.0
        cfg = validate(cfg)
        assert cfg.task.lr_rounds == 8
        _, cert = certify(authority, cfg.node.name, cfg.data_dir)
        nodes.append(Node(cfg, mesh=hub.mesh(cert)))

    async def main() -> None:
        await asyncio.gather(*(node.run() for node in nodes))

    asyncio.run(main())
    for node in nodes:
        records = read_jsonl(node.cfg.metrics_path)
        assert [r["round"] for r in records] == list(range(1, 9))
        assert sum(node.metrics.rejected.values()) == 0 and all(r["missing"] == [] for r in records)
        assert records[-1]["accuracy"] > 0.8, [r["accuracy"] for r in records]
    short = nodes[2]
    path = tmp_path / "model.npz"
    meta = {**task_meta(short.task), "round": 8, "node": short.cfg.node.name}
    save_model(path, get_params(short.model), short.cfg.task, meta)  # the call node.py makes
    whole = write_csv(
        tmp_path / "all.csv",
        [*names, "label"],
        [[*x.tolist(), int(y)] for x, y in zip(d.data, d.target, strict=True)],
    )
    code = model_cli.main(["evaluate", str(path), str(whole), "--json"])
    assert code == 0
