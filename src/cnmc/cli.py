"""The ``cnmc`` command line: one sub-command per pipeline stage.

Settings come from ``params.yaml`` (``--params``); flags override single values. A user
mistake ends in one line on stderr (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cnmc import __version__
from cnmc.atomic import atomic_write_text
from cnmc.config import (
    PARAMS_FILE,
    PROFILES,
    Params,
    load_params,
    merge_params_file,
    profile_params,
    render_params,
)
from cnmc.errors import CnmcError

log = logging.getLogger("cnmc")


def _with_overrides(params: Params, section: str, **values: object) -> Params:
    """Return ``params`` with the non-None ``values`` replacing keys of ``section``."""
    given = {k: v for k, v in values.items() if v is not None}
    if not given:
        return params
    from cnmc.config import parse_params

    raw = params.model_dump()
    if section:
        raw[section].update(given)
    else:
        raw.update(given)
    return parse_params(raw, source="command-line flags")


def _optional(convert: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type where an empty value means "not given" (MLproject parameters default to "")."""

    def parse(text: str) -> object:
        return None if text == "" else convert(text)

    parse.__name__ = convert.__name__  # argparse names the type in its error messages
    return parse


def _positive(convert: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type for a number above zero."""

    def parse(text: str) -> float:
        value = convert(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    parse.__name__ = convert.__name__
    return parse


def _per_class(text: str) -> int | str:
    """``augment.per_class`` from the command line: a count or ``auto``."""
    return text if text == "auto" else int(text)


def _model_uri(args: argparse.Namespace) -> str:
    """``--model``, else the registered alias that ``params.yaml: promote`` names (defaults without a file)."""
    if args.model:
        return args.model
    return (load_params(args.params) if Path(args.params).is_file() else Params()).promote.model_uri


def cmd_profile(args: argparse.Namespace) -> None:
    params = profile_params(args.name)
    out = Path(args.output)
    out.write_text(render_params(params, args.name))
    print(f"wrote profile '{args.name}' to {out}")


def cmd_demo_data(args: argparse.Namespace) -> None:
    from cnmc.data.demo import copy_demo_dataset

    print(copy_demo_dataset(Path(args.out_dir)))


def cmd_manifest(args: argparse.Namespace) -> None:
    from cnmc.data.manifest import build_manifest, write_manifest

    manifest = build_manifest(Path(args.data_dir), progress=not args.quiet)
    write_manifest(manifest, Path(args.output), Path(args.report))
    print(manifest.summary_line(args.report))


def cmd_split(args: argparse.Namespace) -> None:
    from cnmc.data.manifest import read_manifest
    from cnmc.data.split import split_manifest, write_splits

    params = _with_overrides(load_params(args.params), "split", protocol=args.protocol)
    seed = params.seed if args.seed is None else args.seed
    splits = split_manifest(read_manifest(Path(args.manifest)), params.split, seed=seed)
    write_splits(splits, Path(args.out_dir), Path(args.report))
    print(splits.summary_line())


def cmd_augment(args: argparse.Namespace) -> None:
    from cnmc.data.augment import prepare_dataset

    params = _with_overrides(
        load_params(args.params),
        "augment",
        image_size=args.image_size,
        per_class=args.per_class,
        strength=args.strength,
        workers=args.workers,
    )
    seed = params.seed if args.seed is None else args.seed
    summary = prepare_dataset(
        Path(args.splits_dir),
        Path(args.out_dir),
        params.augment,
        seed=seed,
        preview_path=Path(args.preview),
        progress=not args.quiet,
    )
    print(summary)


def cmd_train(args: argparse.Namespace) -> None:
    from cnmc.experiment import RunPaths, train_and_log
    from cnmc.prepare import prepare_work_dir, store_matches

    params = load_params(args.params)
    if args.params_from:
        params = merge_params_file(params, Path(args.params_from))
    params = _with_overrides(
        params, "train",
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, patience=args.patience,
        pretrained=args.pretrained, device=args.device,
    )
    params = _with_overrides(params, "augment", strength=args.aug_strength, image_size=args.image_size)
    if args.seed is not None:
        params = _with_overrides(params, "", seed=args.seed)
    if args.data:
        root = Path(args.work_dir)
        prepare_work_dir(Path(args.data), root, params, Path(args.test_data) if args.test_data else None,
                         progress=not args.quiet)
    elif store_matches(Path("outputs/images"), params):
        root = Path("outputs")
    else:  # no store yet, or flags changed its settings: prepare a matching one beside it
        root = Path("outputs/prepared")
        prepare_work_dir(Path(params.data_dir), root, params, progress=not args.quiet)
    document = train_and_log(params, args.backbone, RunPaths(root, args.backbone), resume=args.resume,
                             weights_path=args.weights_path, progress=not args.quiet)
    if args.metrics_out:
        atomic_write_text(Path(args.metrics_out), json.dumps(document, indent=2) + "\n")
    _print_result(document)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from cnmc.experiment import RunPaths, evaluate_saved

    document = evaluate_saved(load_params(args.params), args.backbone, RunPaths(Path(args.root), args.backbone),
                              progress=not args.quiet)
    if args.metrics_out:
        atomic_write_text(Path(args.metrics_out), json.dumps(document, indent=2) + "\n")
    _print_result(document)


def _print_result(document: dict) -> None:
    tuned = document["test"]["at_tuned"]
    print(f"{document['backbone']}: test F1 (ALL) {tuned['f1_all']:.4f}, macro F1 {tuned['f1_macro']:.4f}, "
          f"AUC {tuned['roc_auc']:.4f} at threshold {document['threshold']:.3f}; MLflow run {document['run_id']}")


def cmd_promote(args: argparse.Namespace) -> None:
    from cnmc.registry import promote, write_promotion
    from cnmc.tracking import data_hash

    params = load_params(args.params)
    result = promote(params.promote, params.split.protocol, data_hash())
    write_promotion(result, Path(args.out_dir))
    print(f"{result.name} v{result.version} ({result.backbone}, {result.metric} {result.value:.4f}): {result.reason}")


def cmd_predict(args: argparse.Namespace) -> None:
    from cnmc.predict import predict_paths

    summary = predict_paths(_model_uri(args), args.inputs, Path(args.output), batch_size=args.batch_size,
                            progress=not args.quiet)
    print(summary.line())


def cmd_serve(args: argparse.Namespace) -> None:
    from cnmc.http_server import serve

    serve(_model_uri(args), args.host, args.port, max_batch=args.max_batch, max_body_mb=args.max_body_mb)


def cmd_tune(args: argparse.Namespace) -> None:
    from cnmc.tune import run_study, write_tuned_params

    params = _with_overrides(load_params(args.params), "tune", n_trials=args.n_trials, epochs=args.epochs,
                             study_name=args.study_name, storage=args.storage, backbone=args.backbone)
    summary = run_study(params, Path(args.store), progress=not args.quiet)
    print(summary)
    if summary.best_trial is not None:
        write_tuned_params(summary, Path(args.output))
        print(f"best parameters written to {args.output}: use `cnmc train --params-from {args.output}`")


def cmd_explain(args: argparse.Namespace) -> None:
    from cnmc.explain import explain_images

    for path in explain_images(_model_uri(args), args.inputs, Path(args.out_dir)):
        print(path)


def cmd_report(args: argparse.Namespace) -> None:
    from cnmc.report import build_report

    backbones = load_params(args.params).train.backbones
    files = [Path(args.metrics_dir) / f"{name}.json" for name in backbones]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        log.warning("no metrics yet for %s", ", ".join(missing))
    files = [f for f in files if f.is_file()]
    if not files:
        raise CnmcError(f"{args.metrics_dir}: no metrics files (run `cnmc train` or `dvc repro` first)")
    print(build_report(files, Path(args.out_dir)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnmc",
        description="C-NMC 2019 leukemia cell classification pipeline (ALL vs Hem). "
        "Stages: demo-data -> manifest -> split -> augment. `dvc repro` runs them in order.",
    )
    parser.add_argument("--version", action="version", version=f"cnmc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], None], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    def add_params(p: argparse.ArgumentParser) -> None:
        p.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
        p.add_argument("--seed", type=int, help="override the params seed")

    def add_model(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="model URI (default: models:/<promote.model_name>@<promote.alias> of --params)")
        p.add_argument("--params", default=PARAMS_FILE, help="params file for the default model (default: %(default)s)")

    p = add("profile", cmd_profile, "Write a params profile (demo: CPU minutes; paper: the paper's exact values).")
    p.add_argument("name", choices=PROFILES)
    p.add_argument("-o", "--output", default=PARAMS_FILE, help="file to write (default: %(default)s)")

    p = add("demo-data", cmd_demo_data,
            "Copy the shipped demo set (523 real C-NMC 2019 cells, Kaggle layout) into a folder.")
    p.add_argument("out_dir", help="folder to create (must be absent or empty)")

    p = add(
        "manifest",
        cmd_manifest,
        "Scan a data folder (Kaggle, TCIA or class-folder layout), check every image, write the manifest.",
    )
    p.add_argument("data_dir", help="raw data folder")
    p.add_argument("-o", "--output", default="outputs/manifest.csv", help="manifest CSV (default: %(default)s)")
    p.add_argument("--report", default="outputs/data_report.json", help="data report JSON (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = add("split", cmd_split, "Cut the manifest into train/val/test (subject-disjoint or the paper's protocol).")
    add_params(p)
    p.add_argument("--manifest", default="outputs/manifest.csv", help="manifest CSV (default: %(default)s)")
    p.add_argument("--out-dir", default="outputs/splits", help="folder for train/val/test CSVs (default: %(default)s)")
    p.add_argument("--report", default="outputs/split_report.json", help="split report JSON (default: %(default)s)")
    p.add_argument("--protocol", choices=("subject", "paper"), help="override split.protocol")

    p = add(
        "augment",
        cmd_augment,
        "Resize all splits and balance the training set to M images per class with the paper's transform T.",
    )
    add_params(p)
    p.add_argument("--splits-dir", default="outputs/splits", help="split CSVs (default: %(default)s)")
    p.add_argument("--out-dir", default="outputs/images", help="image store (default: %(default)s)")
    p.add_argument(
        "--preview", default="outputs/plots/augment_preview.png", help="preview grid PNG (default: %(default)s)"
    )
    p.add_argument("--image-size", type=int, help="override augment.image_size")
    p.add_argument("--per-class", type=_per_class, help="override augment.per_class (M, or 'auto')")
    p.add_argument("--strength", type=float, help="override augment.strength (0..1)")
    p.add_argument("--workers", type=int, help="override augment.workers (0 = all cores)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = add("train", cmd_train, "Fine-tune one backbone, evaluate it on the test split and log the run to MLflow.")
    add_params(p)
    p.add_argument("--backbone", required=True, help="timm backbone, e.g. efficientnet_b3 or tf_efficientnet_lite0")
    p.add_argument("--epochs", type=_optional(int), help="override train.epochs")
    p.add_argument("--patience", type=int, help="override train.patience")
    p.add_argument("--lr", type=_optional(float), help="override train.lr")
    p.add_argument("--batch-size", type=_optional(int), help="override train.batch_size")
    p.add_argument("--aug-strength", type=_optional(float), help="override augment.strength (re-prepares data)")
    p.add_argument("--image-size", type=_optional(int), help="override augment.image_size (re-prepares data)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override train.device")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="start from ImageNet weights (override train.pretrained)")
    p.add_argument("--weights-path", help="local weights file for the backbone (.pth or .safetensors)")
    p.add_argument("--params-from", help="YAML of values layered over --params, e.g. tuned.yaml from `cnmc tune`")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--data", help="train on this data folder directly (any supported layout), not the DVC outputs")
    p.add_argument("--test-data", help="with --data: a separate labelled test folder")
    p.add_argument("--work-dir", default="outputs/direct", help="with --data: working folder (default: %(default)s)")
    p.add_argument("--metrics-out", help="also write the test metrics JSON here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = add("evaluate", cmd_evaluate, "Re-evaluate a trained backbone's saved weights on the test split (a new run).")
    p.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
    p.add_argument("--backbone", required=True, help="backbone whose outputs/models/<backbone> to evaluate")
    p.add_argument("--root", default="outputs", help="pipeline folder (default: %(default)s)")
    p.add_argument("--metrics-out", help="also write the metrics JSON here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = add("promote", cmd_promote,
            "Register the best run (by promote.metric on validation) and move the 'champion' alias if it is better.")
    p.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
    p.add_argument("--out-dir", default="registry", help="champion.json and model_card.md (default: %(default)s)")

    p = add("predict", cmd_predict,
            "Classify image files, folders or globs with a logged model; unreadable files are listed, not fatal.")
    p.add_argument("inputs", nargs="+", metavar="PATH", help="image files, folders (recursive) or glob patterns")
    add_model(p)
    p.add_argument("-o", "--output", default="predictions.csv", help="output CSV (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = add("serve", cmd_serve, "Serve a model (default: the champion) over HTTP: MLflow's scoring app, with "
            "JSON errors, request limits and GET /info (README: serving).")
    add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=5001, help="port (default: %(default)s)")
    p.add_argument("--max-batch", type=_positive(int), default=64,
                   help="images per request; more is refused with 413 (default: %(default)s)")
    p.add_argument("--max-body-mb", type=_positive(float), default=64.0,
                   help="request body limit in MiB; larger is refused with 413 (default: %(default)s)")

    p = add("tune", cmd_tune, "Tune learning rate and augmentation strength with Optuna (validation macro F1).")
    add_params(p)
    p.add_argument("--n-trials", type=_optional(int), help="override tune.n_trials (trials added by this call)")
    p.add_argument("--epochs", type=_optional(int), help="override tune.epochs (per trial)")
    p.add_argument("--study-name", type=_optional(str), help="override tune.study_name (resumed if it exists)")
    p.add_argument("--storage", type=_optional(str),
                   help="override tune.storage, e.g. sqlite:///optuna.db or postgresql://user@host/db")
    p.add_argument("--backbone", help="override tune.backbone")
    p.add_argument("--store", default="outputs/images", help="image store from `cnmc augment` (default: %(default)s)")
    p.add_argument("-o", "--output", default="outputs/tuned.yaml", help="best parameters file (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = add("explain", cmd_explain, "Write Grad-CAM overlays showing what the model looked at in each image.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    add_model(p)
    p.add_argument("-o", "--out-dir", default="explanations", help="where the overlays go (default: %(default)s)")

    p = add("report", cmd_report, "Compare the trained backbones with the paper's Table 2 (markdown, CSV, bar chart).")
    p.add_argument("--params", default=PARAMS_FILE, help="params file naming the backbones (default: %(default)s)")
    p.add_argument("--metrics-dir", default="outputs/metrics", help="metrics JSON files (default: %(default)s)")
    p.add_argument("--out-dir", default="outputs/report", help="where the report goes (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        args.func(args)
    except CnmcError as exc:
        print(f"cnmc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cnmc {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
