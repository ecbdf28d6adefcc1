"""`p2pfl export | evaluate | predict | stats`: what a site does with a model file, and shared scaling.

    p2pfl export MODEL --out PATH [--format npz|pt-state-dict|onnx]
    p2pfl evaluate MODEL DATA [--label-column NAME] [--json]
    p2pfl predict MODEL DATA [--out CSV] [--probabilities]
    p2pfl stats DATA_OR_STATS... --out STATS.json [--label-column NAME] [--features A,B,...]

MODEL is a model file (p2pfl.model_file: the node's model.npz / best_model.npz); DATA a .csv with a
header row or an .npz with X (and y), read by the same code as a node's own data, matched to the
model by column name and scaled with the model's standardisation statistics. Every bad input ends
in one `error: ...` line and exit status 2 (`add_commands` registers the commands on the main
parser, whose main() prints P2PFLErrors that way; `main` here does the same on its own).
torch is imported only inside the commands, so `p2pfl --help` stays fast.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pfl.errors import P2PFLError

if TYPE_CHECKING:
    import numpy as np

    from p2pfl.learning.spec import TaskSpec

__all__ = [
    "EXPORT_FORMATS",
    "add_commands",
    "build_parser",
    "evaluate_command",
    "export_command",
    "main",
    "predict_command",
    "stats_command",
]

EXPORT_FORMATS = ("npz", "pt-state-dict", "onnx")
EVAL_BATCH = 4096


def add_commands(subparsers: Any) -> None:
    """Register export, evaluate and predict on `subparsers` (argparse's add_subparsers result)."""
    export = subparsers.add_parser(
        "export",
        help="write a model file in another format (npz, pt-state-dict, onnx)",
        description="Write MODEL as a model file (npz), a torch state_dict (pt-state-dict; load it with "
        "torch.load(path, weights_only=True)) or ONNX (needs the onnx package; the graph includes the "
        "input standardisation).",
    )
    export.add_argument("model", metavar="MODEL", help="a p2pfl model file (.npz)")
    export.add_argument("--out", required=True, metavar="PATH", help="where to write")
    export.add_argument("--format", choices=EXPORT_FORMATS, default="npz", help="output format (default npz)")
    export.set_defaults(func=export_command)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="accuracy, loss and confusion matrix of a model on a labelled .csv / .npz",
        description="Evaluate MODEL on DATA (a .csv with a header row and the label column, or an .npz "
        "with X and y): accuracy, mean cross-entropy, per-class precision / recall and the confusion matrix.",
    )
    evaluate.add_argument("model", metavar="MODEL", help="a p2pfl model file (.npz)")
    evaluate.add_argument("data", metavar="DATA", help="labelled data: .csv (header row) or .npz (X, y)")
    evaluate.add_argument("--label-column", help="CSV label column (default: the model's, usually 'label')")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    evaluate.set_defaults(func=evaluate_command)

    predict = subparsers.add_parser(
        "predict",
        help="the class of every row of a .csv / .npz, as CSV",
        description="Predict a class for every row of DATA (a .csv with the model's feature columns, or an "
        ".npz with X); writes CSV with columns row, predicted (and prob_<class> with --probabilities).",
    )
    predict.add_argument("model", metavar="MODEL", help="a p2pfl model file (.npz)")
    predict.add_argument("data", metavar="DATA", help=".csv (header row) or .npz (X)")
    predict.add_argument("--out", metavar="CSV", help="write here instead of standard output")
    predict.add_argument("--probabilities", action="store_true", help="add one probability column per class")
    predict.add_argument("--label-column", help="CSV label column to ignore (default: the model's)")
    predict.set_defaults(func=predict_command)

    stats = subparsers.add_parser(
        "stats",
        help="feature statistics for shared standardisation: of a data file, or several combined",
        description="Each site: `p2pfl stats site.csv --out site.json` (counts, means and spreads of the "
        "features, no rows). One person: `p2pfl stats a.json b.json c.json --out federation.json`, sent to "
        "every site as [task] feature_stats (with standardize = true), so every site scales the same way.",
    )
    stats.add_argument(
        "inputs", nargs="+", metavar="DATA_OR_STATS", help=".csv / .npz data or .json statistics"
    )
    stats.add_argument("--out", required=True, metavar="JSON", help="where to write the statistics")
    stats.add_argument("--label-column", default="label", help="CSV label column, left out (default 'label')")
    stats.add_argument(
        "--features", help="comma-separated CSV feature columns, in model order ([task] features)"
    )
    stats.set_defaults(func=stats_command)


def build_parser() -> argparse.ArgumentParser:
    """A parser with only these commands (tests, `python -m p2pfl.model_cli`)."""
    parser = argparse.ArgumentParser(prog="p2pfl", description=__doc__.split("\n\n")[0])
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a P2PFLError becomes one `error:` line on stderr and status 2."""
    args = build_parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.func
    try:
        return command(args)
    except P2PFLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------------------------------
# the commands


def export_command(args: argparse.Namespace) -> int:
    from p2pfl import model_file

    params, spec, meta = model_file.load_model(args.model)
    out = Path(args.out)
    _check_out(out)
    if args.format == "npz":
        model_file.save_model(out, params, spec, {**meta, "exported_from": str(args.model)})
        print(f"wrote {out} (p2pfl model file, {len(params)} tensors)")
    elif args.format == "pt-state-dict":
        _export_state_dict(out, params)
        print(
            f"wrote {out}: torch state_dict, {len(params)} tensors; load with torch.load(path, weights_only=True)"
        )
        try:
            print(f"architecture:\n{model_file.build_model(params, spec, meta)}")
        except model_file.ModelFileError:
            pass  # a custom task: its architecture is the user's own code
        if model_file.standardizer(meta) is not None:
            print("inputs must be standardised with feature_mean / feature_std from the model file's meta")
    else:
        _export_onnx(out, params, spec, meta)
        print(f"wrote {out} (ONNX: input 'features' (n, {meta.get('features')}), output 'logits')")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    import numpy as np

    x, y, spec, meta, probs = _run(args, labels=True)
    assert y is not None
    classes = probs.shape[1]
    if y.size and int(y.max()) >= classes:
        bad = np.unique(y[y >= classes])[:10].tolist()
        raise P2PFLError(
            f"{args.data}: label(s) {bad} are outside the model's classes 0..{classes - 1}; "
            "is this the right model for this data?"
        )
    pred = probs.argmax(axis=1)
    picked = probs[np.arange(len(y)), y]
    loss = float(-np.log(np.maximum(picked, 1e-12)).mean())
    accuracy = float((pred == y).mean())
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    names = _class_names(spec, meta, classes)
    per_class = []
    for c in range(classes):
        tp, predicted, support = confusion[c, c], confusion[:, c].sum(), confusion[c, :].sum()
        per_class.append(
            {
                "class": names[c],
                "support": int(support),
                "precision": float(tp / predicted) if predicted else None,
                "recall": float(tp / support) if support else None,
            }
        )
    result = {
        "model": str(args.model),
        "data": str(args.data),
        "rows": len(y),
        "accuracy": accuracy,
        "loss": loss,
        "classes": names,
        "confusion": confusion.tolist(),
        "per_class": per_class,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(_evaluation_table(result, spec, meta))
    return 0


def predict_command(args: argparse.Namespace) -> int:
    x, _, spec, meta, probs = _run(args, labels=False)
    classes = probs.shape[1]
    names = _class_names(spec, meta, classes)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["row", "predicted"] + ([f"prob_{n}" for n in names] if args.probabilities else []))
    for i, row in enumerate(probs):
        cells: list[Any] = [i, names[int(row.argmax())]]
        if args.probabilities:
            cells += [f"{p:.6g}" for p in row]
        writer.writerow(cells)
    if args.out:
        out = Path(args.out)
        _check_out(out)
        _write_atomic(out, buf.getvalue().encode("utf-8"))
        print(f"wrote {len(probs)} predictions to {out}", file=sys.stderr)
    else:
        sys.stdout.write(buf.getvalue())
    return 0


def stats_command(args: argparse.Namespace) -> int:
    from p2pfl.errors import ConfigError
    from p2pfl.learning.data import combine_feature_stats, feature_stats, read_table

    features = [f.strip() for f in args.features.split(",") if f.strip()] if args.features else []
    parts: list[dict[str, Any]] = []
    for item in args.inputs:
        path = Path(item)
        if path.suffix.lower() == ".json":
            try:
                parts.append(json.loads(path.read_text(encoding="utf-8")))
            except FileNotFoundError:
                raise P2PFLError(f"statistics file {item!r} not found") from None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise P2PFLError(f"statistics file {item!r} is not readable JSON ({exc})") from None
        else:
            table = read_table(
                path,
                label_column=args.label_column,
                features=features if path.suffix.lower() == ".csv" else (),
                labels=False,
                what="DATA",
                label_hint="pass --label-column NAME",
            )
            parts.append(feature_stats(table.x, table.feature_names))
    try:
        combined = combine_feature_stats(parts, what="stats")
    except ConfigError as exc:
        raise P2PFLError(str(exc)) from None
    out = Path(args.out)
    _check_out(out)
    _write_atomic(out, (json.dumps(combined, indent=1) + "\n").encode("utf-8"))
    print(f"wrote {out}: statistics of {combined['count']} rows, {len(combined['mean'])} features")  # type: ignore[arg-type]
    return 0


# --------------------------------------------------------------------------------------------------
# shared steps


def _run(
    args: argparse.Namespace, *, labels: bool
) -> tuple[np.ndarray, np.ndarray | None, TaskSpec, dict[str, Any], np.ndarray]:
    """Load the model and the data (matched to it), run the model: (x, y, spec, meta, probabilities)."""
    import torch

    from p2pfl import model_file

    params, spec, meta = model_file.load_model(args.model)
    model = model_file.build_model(params, spec, meta)
    x, y = _read_data(args, spec, meta, labels=labels)
    scaler = model_file.standardizer(meta)
    if scaler is not None:
        x = scaler.apply(x)
    out = []
    with torch.no_grad():
        for start in range(0, len(x), EVAL_BATCH):
            logits = model(torch.from_numpy(x[start : start + EVAL_BATCH]))
            out.append(torch.softmax(logits.to(torch.float64), dim=1).numpy())
    import numpy as np

    return x, y, spec, meta, np.concatenate(out)


def _read_data(
    args: argparse.Namespace, spec: TaskSpec, meta: dict[str, Any], *, labels: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    from p2pfl.learning.data import read_table

    path = Path(args.data)
    label_column = args.label_column or meta.get("label_column") or spec.label_column
    names = meta.get("feature_names") or ()
    features = meta.get("features")
    table = read_table(
        path,
        label_column=label_column,
        features=names if path.suffix.lower() == ".csv" else (),
        class_names=spec.class_names,
        labels=labels,
        what="DATA",
        label_hint="pass --label-column NAME",
    )
    if features is not None and table.x.shape[1] != features:
        raise P2PFLError(
            f"data {str(path)!r} has {table.x.shape[1]} feature columns but the model takes {features}"
            + (f" ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})" if names else "")
            + f"; leave out everything but the features and the label column {label_column!r}"
        )
    if table.ignored_columns:
        print(f"note: ignoring column(s) {', '.join(table.ignored_columns)}", file=sys.stderr)
    return table.x, table.y


def _class_names(spec: TaskSpec, meta: dict[str, Any], classes: int) -> list[str]:
    names = meta.get("class_names") or list(spec.class_names)
    if isinstance(names, list) and len(names) == classes:
        return [str(n) for n in names]
    return [str(c) for c in range(classes)]


def _evaluation_table(result: dict[str, Any], spec: TaskSpec, meta: dict[str, Any]) -> str:
    names: list[str] = result["classes"]
    about = ", ".join(
        f"{k} {meta[k]}" for k in ("round", "node") if meta.get(k) is not None
    )  # where the model came from
    lines = [
        f"model {result['model']} (task {spec.name}, {meta.get('features')} features, {len(names)} classes"
        + (f", {about}" if about else "")
        + ")",
        f"data  {result['data']}: {result['rows']} rows",
        f"accuracy {result['accuracy']:.4f}   loss {result['loss']:.4f}",
        "",
        "confusion matrix (rows: true class, columns: predicted)",
    ]
    width = max(8, *(len(n) + 1 for n in names))
    lines.append(" " * width + "".join(f"{n:>{width}}" for n in names))
    for n, row in zip(names, result["confusion"], strict=True):
        lines.append(f"{n:>{width}}" + "".join(f"{v:>{width}}" for v in row))
    lines += ["", f"{'class':>{width}}{'precision':>11}{'recall':>9}{'support':>9}"]
    for c in result["per_class"]:
        p = "-" if c["precision"] is None else f"{c['precision']:.3f}"
        r = "-" if c["recall"] is None else f"{c['recall']:.3f}"
        lines.append(f"{c['class']:>{width}}{p:>11}{r:>9}{c['support']:>9}")
    return "\n".join(lines)


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise P2PFLError(f"--out {str(out)!r} is a directory; name a file in it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise P2PFLError(f"--out {str(out)!r}: directory {str(parent)!r} does not exist")


def _write_atomic(out: Path, data: bytes) -> None:
    from p2pfl.checkpoint import _atomic_write

    try:
        _atomic_write(out, lambda fh: fh.write(data))
    except OSError as exc:
        raise P2PFLError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from None


def _export_state_dict(out: Path, params: dict[str, np.ndarray]) -> None:
    from collections import OrderedDict

    import torch

    state = OrderedDict((name, torch.from_numpy(arr.copy())) for name, arr in params.items())
    buf = io.BytesIO()
    torch.save(state, buf)
    _write_atomic(out, buf.getvalue())


def _export_onnx(out: Path, params: dict[str, np.ndarray], spec: TaskSpec, meta: dict[str, Any]) -> None:
    import importlib.util

    import torch
    from torch import nn

    from p2pfl import model_file

    if importlib.util.find_spec("onnx") is None:
        raise P2PFLError(
            "--format onnx needs the onnx package, which is not installed (pip install onnx); "
            "npz and pt-state-dict work without it"
        )
    model = model_file.build_model(params, spec, meta)
    scaler = model_file.standardizer(meta)

    class Scaled(nn.Module):
        """The model behind its input standardisation, so the ONNX graph takes raw features."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = model
            # plain attributes: the exporter bakes them into the graph as constants
            self.mean = None if scaler is None else torch.from_numpy(scaler.mean.copy())
            self.std = None if scaler is None else torch.from_numpy(scaler.std.copy())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.mean is not None and self.std is not None:
                x = (x - self.mean) / self.std
            return self.inner(x)

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else ".")
    os.close(fd)
    try:
        torch.onnx.export(
            Scaled().eval(),
            (torch.zeros(1, int(meta["features"])),),
            tmp,
            dynamo=False,
            input_names=["features"],
            output_names=["logits"],
            dynamic_axes={"features": {0: "rows"}, "logits": {0: "rows"}},
        )
        os.replace(tmp, out)
    except Exception as exc:  # the exporter's own errors: one line, not a traceback
        raise P2PFLError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
