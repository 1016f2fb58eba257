"""Sub-commands that fit and judge models: ``train``, ``evaluate``, ``ensemble``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cnmc.cli.common import add_command, add_params, add_quiet, add_setting, add_settings, params_from_args
from cnmc.core.config import Params
from cnmc.core.errors import CnmcError

if TYPE_CHECKING:
    from cnmc.jobs.paths import RunPaths


def cmd_train(args: argparse.Namespace) -> None:
    from cnmc.jobs.launch import train
    from cnmc.jobs.paths import default_root

    if args.data and args.run_dir:
        raise CnmcError("--data trains in --work-dir (its prepared store and run go there): drop --run-dir")
    params = params_from_args(args)
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

    _evaluate(params_from_args(args), RunPaths(Path(args.root or default_root()), args.backbone), args)


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

    params = params_from_args(args)
    backbones = args.backbones.split(",") if args.backbones else params.train.backbones
    print(build_ensemble(params, backbones, Path(args.root)))


def _add_ood_data(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ood-data",
        metavar="DIR",
        help="a folder of cells from elsewhere (another lab, stain or microscope): report how many the model "
        "flags as unlike its training cells and how well its score tells them from the test cells (ROC AUC)",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
        "train",
        cmd_train,
        "Fine-tune one backbone and log the run to MLflow; then evaluate it (cnmc evaluate) unless --no-evaluate.",
    )
    add_params(p)
    p.add_argument("--backbone", required=True, help="timm backbone, e.g. efficientnet_b3 or tf_efficientnet_lite0")
    add_settings(
        p,
        (
            ("--epochs", "train.epochs"),
            ("--lr", "train.lr"),
            ("--batch-size", "train.batch_size"),
            ("--device", "train.device"),
            ("--image-size", "augment.image_size"),
            ("--seed", "seed"),
        ),
    )
    add_setting(p, "--pretrained", "train.pretrained", action=argparse.BooleanOptionalAction, metavar=None)
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
    _add_ood_data(p)
    add_quiet(p, bars=True)

    p = add_command(
        sub,
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
    _add_ood_data(p)
    add_quiet(p, bars=True)

    p = add_command(
        sub,
        "ensemble",
        cmd_ensemble,
        "Judge the mean P(ALL) of evaluated backbones on the same store and log it as one servable model.",
    )
    add_params(p)
    p.add_argument("--backbones", help="comma-separated evaluated backbones (default: train.backbones)")
    p.add_argument("--root", default="outputs", help="pipeline folder (default: %(default)s)")
