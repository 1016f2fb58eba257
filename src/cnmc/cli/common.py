"""What several sub-commands share, defined once: how a command is added, the settings flags
(``--params``, ``--set`` and the shorthand flags for single settings), the model flags
(``--model``, ``--trust-model``), ``--quiet``, and the argparse types for numbers and ports.

A module of :mod:`cnmc.cli` adds its commands with :func:`add_command` and these flag groups, so a
flag several commands take reads the same everywhere.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from pathlib import Path

from cnmc.core.config import PARAMS_FILE, Params, apply_overrides, load_params, merge_params_file

SETTING_PREFIX = "setting:"  # argparse dest of a flag that is shorthand for ``--set KEY=VALUE``

Command = Callable[[argparse.Namespace], None]


def params_from_args(args: argparse.Namespace) -> Params:
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


def model_uri(args: argparse.Namespace) -> str:
    """``--model``, else the registered alias that ``params.yaml: promote`` names."""
    return args.model or params_from_args(args).promote.model_uri


def positive(convert: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type for a number above zero."""

    def parse(text: str) -> float:
        value = convert(text)
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
        return value

    parse.__name__ = convert.__name__
    return parse


def port(text: str) -> int:
    """An argparse type for a TCP port a server can listen on."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, got {number}")
    return number


def add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, func: Command, help_: str
) -> argparse.ArgumentParser:
    """A sub-command ``name`` that runs ``func``; ``help_`` is both its line in ``cnmc --help`` and
    its description."""
    p = sub.add_parser(name, help=help_, description=help_)
    p.set_defaults(func=func)
    return p


def add_params(p: argparse.ArgumentParser, model_only: bool = False) -> None:
    """``--params`` and ``--set``: read with :func:`params_from_args`."""
    p.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one setting of the params file, e.g. --set train.lr=3e-4 (repeatable; "
        "values are YAML, checked like params.yaml)",
    )
    p.set_defaults(model_only=model_only)


def add_setting(p: argparse.ArgumentParser, flag: str, key: str, **kwargs: object) -> None:
    """A flag people type daily, shorthand for ``--set KEY=VALUE`` (an empty value keeps the file's)."""
    kwargs.setdefault("metavar", "VALUE")
    p.add_argument(flag, dest=SETTING_PREFIX + key, help=f"override {key} (same as --set {key}=VALUE)", **kwargs)  # type: ignore[arg-type]


def add_settings(p: argparse.ArgumentParser, flags: Iterable[tuple[str, str]]) -> None:
    """:func:`add_setting` for each ``(flag, key)``."""
    for flag, key in flags:
        add_setting(p, flag, key)


def add_model(p: argparse.ArgumentParser) -> None:
    """``--model`` and ``--trust-model`` (read with :func:`model_uri`), and the settings flags for a
    command that needs no params file."""
    p.add_argument("--model", help="model URI (default: models:/<promote.model_name>@<promote.alias> of --params)")
    p.add_argument(
        "--trust-model",
        action="store_true",
        help="load a model not laid out as cnmc logs its models with its own code (by default only its "
        "weights and settings are read, and such a model is refused)",
    )
    add_params(p, model_only=True)


def add_quiet(p: argparse.ArgumentParser, bars: bool = False) -> None:
    """``-q/--quiet``: no progress bar (``bars``: the command shows several)."""
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars" if bars else "no progress bar")
