"""Sub-commands that make the settings and the data: ``profile``, ``demo-data``, ``manifest``,
``split``, ``augment``."""

from __future__ import annotations

import argparse
from pathlib import Path

from cnmc.cli.common import add_command, add_params, add_quiet, add_setting, add_settings, params_from_args
from cnmc.core.atomic import atomic_write_text
from cnmc.core.config import PARAMS_FILE, PROFILES, Params, profile_params, render_params
from cnmc.core.errors import CnmcError


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

    params = params_from_args(args)
    _check_weights(params)
    splits = split_manifest(read_manifest(Path(args.manifest)), params.split, seed=params.seed)
    write_splits(splits, Path(args.out_dir), Path(args.report))
    print(splits.summary_line())


def cmd_augment(args: argparse.Namespace) -> None:
    from cnmc.data.augment import prepare_dataset

    params = params_from_args(args)
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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
        "profile",
        cmd_profile,
        "Write a params profile (demo: CPU minutes; real: real data on a CPU; paper: its exact values).",
    )
    p.add_argument("name", choices=PROFILES)
    p.add_argument("-o", "--output", default=PARAMS_FILE, help="file to write (default: %(default)s)")

    p = add_command(
        sub,
        "demo-data",
        cmd_demo_data,
        "Copy the shipped demo set (523 real C-NMC 2019 cells, Kaggle layout) into a folder.",
    )
    p.add_argument("out_dir", help="folder to create (must be absent or empty)")

    p = add_command(
        sub,
        "manifest",
        cmd_manifest,
        "Scan a data folder (Kaggle, TCIA or class-folder layout), check every image, write the manifest.",
    )
    p.add_argument("data_dir", help="raw data folder")
    p.add_argument("-o", "--output", default="outputs/manifest.csv", help="manifest CSV (default: %(default)s)")
    p.add_argument("--report", default="outputs/data_report.json", help="data report JSON (default: %(default)s)")
    add_quiet(p)

    p = add_command(
        sub, "split", cmd_split, "Cut the manifest into train/val/test (subject-disjoint or the paper's protocol)."
    )
    add_params(p)
    p.add_argument("--manifest", default="outputs/manifest.csv", help="manifest CSV (default: %(default)s)")
    p.add_argument("--out-dir", default="outputs/splits", help="folder for train/val/test CSVs (default: %(default)s)")
    p.add_argument("--report", default="outputs/split_report.json", help="split report JSON (default: %(default)s)")
    add_setting(p, "--protocol", "split.protocol", choices=("subject", "paper"), metavar="{subject,paper}")
    add_setting(p, "--seed", "seed")

    p = add_command(
        sub,
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
    add_settings(
        p,
        (
            ("--image-size", "augment.image_size"),
            ("--per-class", "augment.per_class"),
            ("--strength", "augment.strength"),
            ("--workers", "augment.workers"),
            ("--seed", "seed"),
        ),
    )
    add_quiet(p)
