"""The sub-command that searches settings: ``tune``."""

from __future__ import annotations

import argparse
from pathlib import Path

from cnmc.cli.common import add_command, add_params, add_quiet, add_settings, params_from_args


def cmd_tune(args: argparse.Namespace) -> None:
    from cnmc.jobs.tune import run_study, write_tuned_params

    params = params_from_args(args)
    summary = run_study(params, Path(args.store), progress=not args.quiet)
    print(summary)
    if summary.best_trial is not None:
        write_tuned_params(summary, Path(args.output))
        print(f"best parameters written to {args.output}: use `cnmc train --params-from {args.output}`")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub, "tune", cmd_tune, "Tune learning rate and augmentation strength with Optuna (validation macro F1)."
    )
    add_params(p)
    add_settings(
        p,
        (
            ("--n-trials", "tune.n_trials"),
            ("--epochs", "tune.epochs"),
            ("--study-name", "tune.study_name"),
            ("--storage", "tune.storage"),
            ("--backbone", "tune.backbone"),
        ),
    )
    p.add_argument("--store", default="outputs/images", help="image store from `cnmc augment` (default: %(default)s)")
    p.add_argument("-o", "--output", default="outputs/tuned.yaml", help="best parameters file (default: %(default)s)")
    add_quiet(p, bars=True)
