"""The ``cnmc`` command line: one sub-command per pipeline stage.

Settings come from ``params.yaml`` (``--params``); flags override single values. A user
mistake ends in one line on stderr (exit 2), never a traceback.

Each module of this package holds a group of sub-commands: their ``cmd_*`` functions and a
``register(sub)`` that adds their parsers; :data:`GROUPS` lists the groups in the order
``cnmc --help`` shows them. Flags several commands share are defined in :mod:`cnmc.cli.common`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cnmc import __version__
from cnmc.cli import data, registry, reports, serving, training, tuning
from cnmc.core.errors import CnmcError

log = logging.getLogger("cnmc")

GROUPS = (data, training, registry, serving, tuning, reports)  # their commands, in this order, make `cnmc --help`


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
    for group in GROUPS:
        group.register(sub)
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
