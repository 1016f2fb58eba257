"""The ``cnmc`` command line: one sub-command per pipeline stage.

Settings come from ``params.yaml`` (``--params``); flags override single values. A user
mistake ends in one line on stderr (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cnmc import __version__
from cnmc.config import PARAMS_FILE, PROFILES, Params, load_params, profile_params, render_params
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


def cmd_profile(args: argparse.Namespace) -> None:
    params = profile_params(args.name)
    out = Path(args.output)
    out.write_text(render_params(params, args.name))
    print(f"wrote profile '{args.name}' to {out}")


def cmd_demo_data(args: argparse.Namespace) -> None:
    from cnmc.data.demo import write_demo_dataset

    params = load_params(args.params) if Path(args.params).is_file() else Params()
    params = _with_overrides(
        params,
        "demo",
        train_subjects_per_class=args.train_subjects,
        prelim_subjects_per_class=args.prelim_subjects,
        all_cells_per_subject=args.all_cells,
        hem_cells_per_subject=args.hem_cells,
        final_images=args.final_images,
    )
    seed = params.seed if args.seed is None else args.seed
    summary = write_demo_dataset(Path(args.out_dir), params.demo, seed=seed)
    print(summary)


def cmd_manifest(args: argparse.Namespace) -> None:
    from cnmc.data.manifest import build_manifest, write_manifest

    manifest = build_manifest(Path(args.data_dir), progress=not args.quiet)
    write_manifest(manifest, Path(args.output), Path(args.report))
    print(manifest.summary_line())


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

    p = add("profile", cmd_profile, "Write a params profile (demo: CPU minutes; paper: the paper's exact values).")
    p.add_argument("name", choices=PROFILES)
    p.add_argument("-o", "--output", default=PARAMS_FILE, help="file to write (default: %(default)s)")

    p = add(
        "demo-data",
        cmd_demo_data,
        "Write the deterministic synthetic demo set in the Kaggle C-NMC layout (450x450 BMP cells).",
    )
    p.add_argument("out_dir", help="folder to create (must be absent or empty)")
    add_params(p)
    p.add_argument("--train-subjects", type=int, help="training subjects per class")
    p.add_argument("--prelim-subjects", type=int, help="preliminary-test subjects per class")
    p.add_argument("--all-cells", type=int, help="cells per ALL subject")
    p.add_argument("--hem-cells", type=int, help="cells per Hem subject")
    p.add_argument("--final-images", type=int, help="unlabelled final-phase images")

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
    p.add_argument("--per-class", type=int, help="override augment.per_class (M)")
    p.add_argument("--strength", type=float, help="override augment.strength (0..1)")
    p.add_argument("--workers", type=int, help="override augment.workers (0 = all cores)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
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
