"""The ``cnmc`` command line: one sub-command per pipeline stage.

Settings come from ``params.yaml`` (``--params``); flags override single values. A user
mistake ends in one line on stderr (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cnmc import __version__
from cnmc.core.atomic import atomic_write_text
from cnmc.core.config import (
    PARAMS_FILE,
    PROFILES,
    Params,
    apply_overrides,
    load_params,
    merge_params_file,
    profile_params,
    render_params,
)
from cnmc.core.errors import CnmcError

if TYPE_CHECKING:
    from cnmc.jobs.paths import RunPaths

log = logging.getLogger("cnmc")


SETTING_PREFIX = "setting:"  # argparse dest of a flag that is shorthand for ``--set KEY=VALUE``


def _params(args: argparse.Namespace) -> Params:
    """``--params`` (the defaults where a model-only command finds no file), then ``--params-from``,
    then the shorthand flags and every ``--set``, in that order: the one way settings are overridden."""
    path = Path(args.params)
    params = load_params(path) if path.is_file() or not args.model_only else Params()
    if getattr(args, "params_from", None):
        params = merge_params_file(params, Path(args.params_from))
    shorthand = [
        f"{dest.removeprefix(SETTING_PREFIX)}={value}"
        for dest, value in vars(args).items()
        if dest.startswith(SETTING_PREFIX) and value is not None
    ]
    return apply_overrides(params, shorthand + list(args.set or []))


def _positive(convert: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type for a number above zero."""

    def parse(text: str) -> float:
        value = convert(text)
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
        return value

    parse.__name__ = convert.__name__
    return parse


def _port(text: str) -> int:
    """An argparse type for a TCP port a server can listen on."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, got {port}")
    return port


def _model_uri(args: argparse.Namespace) -> str:
    """``--model``, else the registered alias that ``params.yaml: promote`` names."""
    return args.model or _params(args).promote.model_uri


def cmd_profile(args: argparse.Namespace) -> None:
    from cnmc.models.backbones import missing_weights

    params = profile_params(args.name)
    out = Path(args.output)
    atomic_write_text(out, render_params(params, args.name))
    print(f"wrote profile '{args.name}' to {out}")
    for problem in missing_weights(params.train.backbones, params.train.pretrained, params.train.weights_dir):
        print(f"  before `dvc repro`: {problem}")


def _check_weights(params: Params) -> None:
    """Stop before any data work when a backbone of the pipeline cannot get its pretrained weights."""
    train = params.train
    if not train.pretrained:
        return  # nothing to look for (and no reason to import timm)
    from cnmc.models.backbones import missing_weights

    if problems := missing_weights(train.backbones, train.pretrained, train.weights_dir):
        raise CnmcError(f"{len(problems)} backbone(s) of train.backbones lack weights; " + "; ".join(problems))


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

    params = _params(args)
    _check_weights(params)
    splits = split_manifest(read_manifest(Path(args.manifest)), params.split, seed=params.seed)
    write_splits(splits, Path(args.out_dir), Path(args.report))
    print(splits.summary_line())


def cmd_augment(args: argparse.Namespace) -> None:
    from cnmc.data.augment import prepare_dataset

    params = _params(args)
    _check_weights(params)
    summary = prepare_dataset(
        Path(args.splits_dir),
        Path(args.out_dir),
        params.augment,
        seed=params.seed,
        preview_path=Path(args.preview),
        progress=not args.quiet,
    )
    print(summary)


def cmd_train(args: argparse.Namespace) -> None:
    from cnmc.jobs.launch import train
    from cnmc.jobs.paths import default_root

    if args.data and args.run_dir:
        raise CnmcError("--data trains in --work-dir (its prepared store and run go there): drop --run-dir")
    params = _params(args)
    root = Path(args.work_dir) if args.data else Path(args.run_dir or default_root())
    fit, paths = train(
        params,
        args.backbone,
        root,
        data=Path(args.data) if args.data else None,
        test_data=Path(args.test_data) if args.test_data else None,
        resume=args.resume,
        weights_path=args.weights_path,
        progress=not args.quiet,
    )
    if fit is None:  # not rank 0: rank 0 reports and evaluates
        return
    if not args.evaluate:
        epochs = f"{fit.epochs_run} epoch{'s' if fit.epochs_run != 1 else ''}"
        print(
            f"{fit.backbone}: trained {epochs}, kept epoch {fit.best_epoch} "
            f"({fit.epoch_selection}) in {paths.model_dir}; MLflow run {fit.run_id}; evaluate with "
            f"`cnmc evaluate --backbone {fit.backbone}" + ("" if root == default_root() else f" --root {root}") + "`"
        )
        return
    _evaluate(params, paths, args)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from cnmc.jobs.paths import RunPaths, default_root

    _evaluate(_params(args), RunPaths(Path(args.root or default_root()), args.backbone), args)


def _evaluate(params: Params, paths: RunPaths, args: argparse.Namespace) -> None:
    from cnmc.jobs.evaluate import evaluate_and_log

    ood_data = Path(args.ood_data) if args.ood_data else None
    if ood_data and not ood_data.is_dir():
        raise CnmcError(f"{ood_data}: not a folder (--ood-data takes a folder of cell images from elsewhere)")
    document = evaluate_and_log(params, paths.backbone, paths, ood_data)
    metrics_out = args.metrics_out
    if metrics_out:
        document.save(Path(metrics_out))
    tuned = document.reported.at_tuned
    print(
        f"{document.backbone}: test F1 (ALL) {tuned['f1_all']:.4f}, macro F1 {tuned['f1_macro']:.4f}, "
        f"balanced accuracy {tuned['balanced_accuracy']:.4f}, AUC {tuned['roc_auc']:.4f} at threshold "
        f"{document.threshold:.3f}{' with 8-view TTA' if document.tta else ''}; MLflow run {document.run_id}"
    )
    if document.familiarity:
        print(f"{document.backbone}: {document.familiarity.line()}")
    print(f"  validation chose: {document.validation.reason}")


def cmd_ensemble(args: argparse.Namespace) -> None:
    from cnmc.jobs.ensemble import build_ensemble

    params = _params(args)
    backbones = args.backbones.split(",") if args.backbones else params.train.backbones
    print(build_ensemble(params, backbones, Path(args.root)))


def cmd_promote(args: argparse.Namespace) -> None:
    from cnmc.jobs.promote import pipeline_may_release, promote_and_write

    params = _params(args)
    release = pipeline_may_release(params.promote) if args.from_pipeline else True
    result = promote_and_write(params, Path(args.out_dir), release=release)
    ranked = f"{params.promote.rank_on} {result.metric} {result.value:.4f}"  # which split ranked the runs
    print(f"{result.name} v{result.version} ({result.backbone}, {ranked}): {result.reason}")


def cmd_predict(args: argparse.Namespace) -> None:
    from cnmc.serving.batch import People, predict_paths
    from cnmc.serving.spark import DEFAULT_MASTER

    if args.subject is not None and args.by == "subject":
        raise CnmcError("--subject NAME makes every input one person's: it does not go with --by subject")
    if args.subjects_csv and args.by != "subject":
        raise CnmcError("--subjects-csv names each file's person: use it with --by subject")
    if args.master and args.engine != "spark":
        raise CnmcError("--master names a Spark master: use it with --engine spark")
    people = None
    if args.subject is not None:
        people = People(subject=args.subject)
    elif args.by == "subject":
        people = People(csv=Path(args.subjects_csv) if args.subjects_csv else None)
    summary = predict_paths(
        _model_uri(args),
        args.inputs,
        Path(args.output),
        batch_size=args.batch_size,
        progress=not args.quiet,
        people=people,
        spark_master=(args.master or DEFAULT_MASTER) if args.engine == "spark" else None,
        trust=args.trust_model,
    )
    print(summary.line())


def cmd_serve(args: argparse.Namespace) -> None:
    from cnmc.serving.http_app import MIB, ServerLimits, serve

    limits = ServerLimits(
        max_batch=args.max_batch,
        max_body_bytes=int(args.max_body_mb * MIB),
        max_connections=args.max_connections,
        max_in_flight=args.max_in_flight,
        timeout_s=args.timeout,
        allowed_hosts=served_names(args.host, args.allowed_host),
    )
    serve(_model_uri(args), args.host, args.port, limits, trust=args.trust_model)


def served_names(host: str, extra: list[str]) -> frozenset[str]:
    """The Host names ``cnmc serve`` answers: loopback, the address it listens on (unless a
    wildcard), and the names given with ``--allowed-host``."""
    from cnmc.serving.guard import LOOPBACK_NAMES, host_name

    own = set() if host in ("0.0.0.0", "::", "") else {host_name(host)}
    return LOOPBACK_NAMES | own | {host_name(name) for name in extra}


def cmd_tune(args: argparse.Namespace) -> None:
    from cnmc.jobs.tune import run_study, write_tuned_params

    params = _params(args)
    summary = run_study(params, Path(args.store), progress=not args.quiet)
    print(summary)
    if summary.best_trial is not None:
        write_tuned_params(summary, Path(args.output))
        print(f"best parameters written to {args.output}: use `cnmc train --params-from {args.output}`")


def cmd_explain(args: argparse.Namespace) -> None:
    from cnmc.jobs.explain import explain_images

    for path in explain_images(_model_uri(args), args.inputs, Path(args.out_dir), trust=args.trust_model):
        print(path)


def cmd_report(args: argparse.Namespace) -> None:
    from cnmc.jobs.report import report_backbones

    print(report_backbones(_params(args), Path(args.metrics_dir), Path(args.out_dir)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnmc",
        description="C-NMC 2019 leukemia cell classification pipeline (ALL vs Hem). "
        "`dvc repro` runs the stages in order: manifest -> split -> augment -> train -> evaluate (per backbone) "
        "-> report -> promote; each is also a command below.",
    )
    parser.add_argument("--version", action="version", version=f"cnmc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], None], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    def add_params(p: argparse.ArgumentParser, model_only: bool = False) -> None:
        p.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
        p.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override one setting of the params file, e.g. --set train.lr=3e-4 (repeatable; "
            "values are YAML, checked like params.yaml)",
        )
        p.set_defaults(model_only=model_only)

    def setting(p: argparse.ArgumentParser, flag: str, key: str, **kwargs: object) -> None:
        """A flag people type daily, shorthand for ``--set KEY=VALUE`` (an empty value keeps the file's)."""
        kwargs.setdefault("metavar", "VALUE")
        p.add_argument(flag, dest=SETTING_PREFIX + key, help=f"override {key} (same as --set {key}=VALUE)", **kwargs)  # type: ignore[arg-type]

    def ood_data_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--ood-data",
            metavar="DIR",
            help="a folder of cells from elsewhere (another lab, stain or microscope): report how many the model "
            "flags as unlike its training cells and how well its score tells them from the test cells (ROC AUC)",
        )

    def add_model(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="model URI (default: models:/<promote.model_name>@<promote.alias> of --params)")
        p.add_argument(
            "--trust-model",
            action="store_true",
            help="load a model not laid out as cnmc logs its models with its own code (by default only its "
            "weights and settings are read, and such a model is refused)",
        )
        add_params(p, model_only=True)

    p = add(
        "profile",
        cmd_profile,
        "Write a params profile (demo: CPU minutes; real: real data on a CPU; paper: its exact values).",
    )
    p.add_argument("name", choices=PROFILES)
    p.add_argument("-o", "--output", default=PARAMS_FILE, help="file to write (default: %(default)s)")

    p = add(
        "demo-data",
        cmd_demo_data,
        "Copy the shipped demo set (523 real C-NMC 2019 cells, Kaggle layout) into a folder.",
    )
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
    setting(p, "--protocol", "split.protocol", choices=("subject", "paper"), metavar="{subject,paper}")
    setting(p, "--seed", "seed")

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
    for flag, key in (
        ("--image-size", "augment.image_size"),
        ("--per-class", "augment.per_class"),
        ("--strength", "augment.strength"),
        ("--workers", "augment.workers"),
        ("--seed", "seed"),
    ):
        setting(p, flag, key)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = add(
        "train",
        cmd_train,
        "Fine-tune one backbone and log the run to MLflow; then evaluate it (cnmc evaluate) unless --no-evaluate.",
    )
    add_params(p)
    p.add_argument("--backbone", required=True, help="timm backbone, e.g. efficientnet_b3 or tf_efficientnet_lite0")
    for flag, key in (
        ("--epochs", "train.epochs"),
        ("--lr", "train.lr"),
        ("--batch-size", "train.batch_size"),
        ("--device", "train.device"),
        ("--image-size", "augment.image_size"),
        ("--seed", "seed"),
    ):
        setting(p, flag, key)
    setting(p, "--pretrained", "train.pretrained", action=argparse.BooleanOptionalAction, metavar=None)
    p.add_argument("--weights-path", help="local weights file for the backbone (.pth or .safetensors)")
    p.add_argument("--params-from", help="YAML of values layered over --params, e.g. tuned.yaml from `cnmc tune`")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument(
        "--evaluate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate after training (default; --no-evaluate: fit only, as the DVC train stage)",
    )
    p.add_argument("--data", help="train on this data folder directly (any supported layout), not the DVC outputs")
    p.add_argument("--test-data", help="with --data: a separate labelled test folder")
    p.add_argument("--work-dir", default="outputs/direct", help="with --data: working folder (default: %(default)s)")
    p.add_argument(
        "--run-dir",
        help="where the model, metrics and plots go (default: outputs when DVC runs the stage, else "
        "outputs/runs, outside DVC's outs)",
    )
    p.add_argument("--metrics-out", help="also write the test metrics JSON here")
    ood_data_flag(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = add(
        "evaluate",
        cmd_evaluate,
        "Calibrate a trained backbone on validation, evaluate it on test and log "
        "the served model, in the MLflow run that trained it.",
    )
    add_params(p)
    p.add_argument("--backbone", required=True, help="backbone whose <root>/models/<backbone> to evaluate")
    p.add_argument(
        "--root",
        help="folder of the trained model (default: outputs when DVC runs the stage, else outputs/runs, "
        "where an ad hoc `cnmc train` writes)",
    )
    p.add_argument("--metrics-out", help="also write the metrics JSON here")
    ood_data_flag(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = add(
        "ensemble",
        cmd_ensemble,
        "Judge the mean P(ALL) of evaluated backbones on the same store and log it as one servable model.",
    )
    add_params(p)
    p.add_argument("--backbones", help="comma-separated evaluated backbones (default: train.backbones)")
    p.add_argument("--root", default="outputs", help="pipeline folder (default: %(default)s)")

    p = add(
        "promote",
        cmd_promote,
        "Register the best run (by promote.metric on validation) as 'challenger', and release it: move "
        "'champion' to it if it is better.",
    )
    add_params(p)
    p.add_argument(
        "--out-dir",
        default="registry/release",
        help="promotion.json and model_card.md (default: %(default)s; the DVC stage writes registry/)",
    )
    p.add_argument(
        "--from-pipeline",
        action="store_true",
        help="the DVC stage: release only where promote.pipeline_releases allows, never in `dvc exp run`",
    )

    p = add(
        "predict",
        cmd_predict,
        "Classify image files, folders or globs with a logged model; unreadable files are listed, not fatal.",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="PATH",
        help="image files, folders (recursive), glob patterns, or Parquet tables with a 'path' column",
    )
    add_model(p)
    p.add_argument(
        "-o",
        "--output",
        default="predictions.csv",
        help="output CSV, or Parquet where it ends in .parquet (default: %(default)s); by person: one row per "
        "person, cells in <output>.cells.csv",
    )
    p.add_argument(
        "--engine",
        choices=("local", "spark"),
        default="local",
        help="local: this process; spark: Spark executors through mlflow.pyfunc.spark_udf (docs/scaling.md)",
    )
    p.add_argument("--master", help="with --engine spark: the Spark master URL (default: local[*], every core here)")
    p.add_argument(
        "--by",
        choices=("cell", "subject"),
        default="cell",
        help="subject: a call per person, from the subject in each C-NMC file name (or --subjects-csv)",
    )
    p.add_argument("--subject", metavar="NAME", help="every input is this one person's cells: one call for them")
    p.add_argument("--subjects-csv", metavar="FILE", help="with --by subject: a CSV of path,subject for other names")
    p.add_argument("--batch-size", type=_positive(int), default=32, help="images per model call (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = add(
        "serve",
        cmd_serve,
        "Serve a model (default: the champion) over HTTP: MLflow's scoring app, with "
        "JSON errors, request limits and GET /info (docs/serving.md).",
    )
    add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a name clients use for this server (Host header, page origin) beside 127.0.0.1 and localhost; "
        "other names and other sites' pages get 403 (repeatable)",
    )
    p.add_argument("--port", type=_port, default=5001, help="TCP port, 1-65535 (default: %(default)s)")
    p.add_argument(
        "--max-batch",
        type=_positive(int),
        default=64,
        help="images per request; more is refused with 413 (default: %(default)s)",
    )
    p.add_argument(
        "--max-body-mb",
        type=_positive(float),
        default=64.0,
        help="request body limit in MiB, sent and decoded; larger is refused with 413 (default: %(default)s)",
    )
    p.add_argument(
        "--max-connections",
        type=_positive(int),
        default=64,
        help="connections open at once; more are answered 503 with Retry-After (default: %(default)s)",
    )
    p.add_argument(
        "--max-in-flight",
        type=_positive(int),
        default=8,
        help="requests answered at once (each holds its body); more get 503 with Retry-After (default: %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=_positive(float),
        default=30.0,
        help="seconds for a request's headers to arrive, and again for its body: 408 after (default: %(default)s)",
    )

    p = add("tune", cmd_tune, "Tune learning rate and augmentation strength with Optuna (validation macro F1).")
    add_params(p)
    for flag, key in (
        ("--n-trials", "tune.n_trials"),
        ("--epochs", "tune.epochs"),
        ("--study-name", "tune.study_name"),
        ("--storage", "tune.storage"),
        ("--backbone", "tune.backbone"),
    ):
        setting(p, flag, key)
    p.add_argument("--store", default="outputs/images", help="image store from `cnmc augment` (default: %(default)s)")
    p.add_argument("-o", "--output", default="outputs/tuned.yaml", help="best parameters file (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = add("explain", cmd_explain, "Write Grad-CAM overlays showing what the model looked at in each image.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    add_model(p)
    p.add_argument("-o", "--out-dir", default="explanations", help="where the overlays go (default: %(default)s)")

    p = add("report", cmd_report, "Compare the trained backbones with the paper's Table 2 (markdown, CSV, bar chart).")
    add_params(p)
    p.add_argument("--metrics-dir", default="outputs/metrics", help="metrics JSON files (default: %(default)s)")
    p.add_argument("--out-dir", default="outputs/report", help="where the report goes (default: %(default)s)")
    return parser


def store_problem(exc: BaseException) -> CnmcError | None:
    """A tracking or study database another process holds locked (SQLite), one that cannot be
    reached, or a tracking server that wants credentials or refuses them, as one line naming it;
    None for any other error (a bug keeps its traceback)."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import OperationalError

    from cnmc.tracking.provenance import shown_uri, tracking_uri

    if (
        isinstance(exc, MlflowException)
        and "API request to " in exc.message
        and " failed with exception " in exc.message
    ):
        why = exc.message.split(" failed with exception ", 1)[1]
        reason = "connection refused" if "Connection refused" in why else why.splitlines()[0][:160]
        return CnmcError(f"cannot reach the tracking server {shown_uri(tracking_uri())}: {reason}")
    if isinstance(exc, MlflowException) and "failed with error code 401 " in exc.message:
        return CnmcError(
            f"the tracking server {shown_uri(tracking_uri())} asks who you are (401): set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (docs/team.md)"
        )
    if isinstance(exc, MlflowException) and "failed with error code 403 " in exc.message:
        return CnmcError(
            f"the tracking server {shown_uri(tracking_uri())} refuses this user (403): "
            "ask its admin for permission on the experiment or model"
        )
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OperationalError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    reason = (str(cause.orig).splitlines() or ["unusable"])[0][:200]
    hint = ": another process holds it, try again when it finishes" if "locked" in reason else ""
    return CnmcError(f"{reason}{hint} (tracking store {shown_uri(tracking_uri())})")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        try:
            args.func(args)
        except Exception as exc:
            problem = store_problem(exc)
            if problem is None:
                raise
            raise problem from exc
    except CnmcError as exc:
        from cnmc.tracking.provenance import without_passwords

        print(f"cnmc {args.command}: error: {without_passwords(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cnmc {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
