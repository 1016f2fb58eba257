"""The sub-command that releases a model: ``promote``."""

from __future__ import annotations

import argparse
from pathlib import Path

from cnmc.cli.common import add_command, add_params, params_from_args


def cmd_promote(args: argparse.Namespace) -> None:
    from cnmc.jobs.promote import pipeline_may_release, promote_and_write

    params = params_from_args(args)
    release = pipeline_may_release(params.promote) if args.from_pipeline else True
    result = promote_and_write(params, Path(args.out_dir), release=release)
    ranked = f"{params.promote.rank_on} {result.metric} {result.value:.4f}"  # which split ranked the runs
    print(f"{result.name} v{result.version} ({result.backbone}, {ranked}): {result.reason}")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
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
