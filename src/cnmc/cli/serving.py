"""Sub-commands that answer with a logged model: ``predict`` (files, in batch) and ``serve`` (HTTP)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cnmc.cli.common import add_command, add_model, add_quiet, model_uri, port, positive
from cnmc.core.errors import CnmcError

# ``cnmc serve``'s limits, one flag each: (flag, number type, default, help). Its defaults are
# those of ``cnmc.serving.http_app.ServerLimits``, which this module does not import (it loads MLflow).
LIMIT_FLAGS: tuple[tuple[str, type[int] | type[float], float, str], ...] = (
    ("--max-batch", int, 64, "images per request; more is refused with 413 (default: %(default)s)"),
    (
        "--max-body-mb",
        float,
        64.0,
        "request body limit in MiB, sent and decoded; larger is refused with 413 (default: %(default)s)",
    ),
    (
        "--max-connections",
        int,
        64,
        "connections open at once; more are answered 503 with Retry-After (default: %(default)s)",
    ),
    (
        "--max-in-flight",
        int,
        8,
        "requests answered at once (each holds its body); more get 503 with Retry-After (default: %(default)s)",
    ),
    (
        "--timeout",
        float,
        30.0,
        "seconds for a request's headers to arrive, and again for its body: 408 after (default: %(default)s)",
    ),
)


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
        model_uri(args),
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
    serve(model_uri(args), args.host, args.port, limits, trust=args.trust_model)


def served_names(host: str, extra: list[str]) -> frozenset[str]:
    """The Host names ``cnmc serve`` answers: loopback, the address it listens on (unless a
    wildcard), and the names given with ``--allowed-host``."""
    from cnmc.serving.guard import LOOPBACK_NAMES, host_name

    own = set() if host in ("0.0.0.0", "::", "") else {host_name(host)}
    return LOOPBACK_NAMES | own | {host_name(name) for name in extra}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
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
    p.add_argument("--batch-size", type=positive(int), default=32, help="images per model call (default: %(default)s)")
    add_quiet(p)

    p = add_command(
        sub,
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
    p.add_argument("--port", type=port, default=5001, help="TCP port, 1-65535 (default: %(default)s)")
    for flag, number, default, help_ in LIMIT_FLAGS:
        p.add_argument(flag, type=positive(number), default=default, help=help_)
