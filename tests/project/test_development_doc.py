"""docs/development.md says where each kind of change goes; these tests hold it to the code: every
file it names exists and defines the name it is said to, every command it shows parses, and each
sub-command is registered by exactly one module of ``cnmc.cli``."""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import pkgutil
import re
import shlex
from pathlib import Path
from types import ModuleType

import cnmc.cli
from cnmc.cli import GROUPS, build_parser
from cnmc.core.imports import PACKAGE_DIR

ROOT = PACKAGE_DIR.parents[1]
DOC = ROOT / "docs" / "development.md"
SECTION = "## Where each kind of change goes"


def section(title: str) -> str:
    text = DOC.read_text()
    assert title in text, f"{DOC.name} has no section {title!r}"
    return text.split(title, 1)[1].split("\n## ", 1)[0]


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the first Markdown table in ``text``, as cells."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def quoted(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def is_path(token: str) -> bool:
    return " " not in token and ("/" in token or token.endswith((".py", ".yaml", ".md")))


def resolve(path: str) -> Path:
    """A path of the doc: from the repository where it starts with a top-level file or folder, else
    under ``src/cnmc``."""
    first = path.split("/")[0]
    return ROOT / path if (ROOT / first).exists() else PACKAGE_DIR / path


def defined_names(path: Path) -> set[str]:
    """The names a module defines at its top level."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_every_file_and_name_the_table_gives_exists() -> None:
    rows = table_rows(section(SECTION))
    assert len(rows) >= 8
    problems = []
    for change, where, *_ in rows:
        if not any(is_path(token.split(":")[0]) for token in quoted(where)):
            problems.append(f"{change}: names no file to change")
    for token in {token for row in rows for cell in row for token in quoted(cell)}:
        name = token.split(":")[0]
        if not is_path(name):
            continue
        path = resolve(name)
        if not path.exists():
            problems.append(f"{token}: no {path.relative_to(ROOT)}")
        elif ":" in token and token.split(":", 1)[1] not in defined_names(path):
            problems.append(f"{token}: {path.relative_to(ROOT)} does not define {token.split(':', 1)[1]}")
    assert not problems, "\n".join(problems)


def test_every_command_the_table_shows_runs_as_written() -> None:
    commands = [token for row in table_rows(section(SECTION)) for cell in row for token in quoted(cell)]
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "cnmc":
            try:
                build_parser().parse_args(argv[1:])
            except SystemExit as exc:  # 0 after --help; 2 for a command or flag that does not exist
                assert exc.code == 0, command
        elif argv[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(argv[2]) is not None, command
    assert any(c.startswith("cnmc ") for c in commands) and any(c.startswith("python -m ") for c in commands)


def subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def cli_modules() -> list[ModuleType]:
    return [importlib.import_module(f"cnmc.cli.{m.name}") for m in pkgutil.iter_modules(cnmc.cli.__path__)]


def registered_by(group: ModuleType) -> list[str]:
    sub = argparse.ArgumentParser().add_subparsers()
    group.register(sub)
    return list(sub.choices)


def test_each_subcommand_is_registered_by_exactly_one_module_of_the_cli() -> None:
    with_register = {m.__name__ for m in cli_modules() if hasattr(m, "register")}
    assert {g.__name__ for g in GROUPS} == with_register, "a module with a register() is missing from GROUPS"
    listed = [action.dest for action in subcommands(build_parser())._choices_actions]  # what `cnmc --help` lists
    by_module = {g.__name__: registered_by(g) for g in GROUPS}
    for command in listed:
        homes = [module for module, names in by_module.items() if command in names]
        assert len(homes) == 1, f"{command}: registered by {homes or 'no module'}"
    assert listed == [name for names in by_module.values() for name in names]  # `cnmc --help`: the order of GROUPS


def test_each_subcommand_runs_a_cmd_function_of_the_module_that_registers_it() -> None:
    for group in GROUPS:
        sub = argparse.ArgumentParser().add_subparsers()
        group.register(sub)
        for name, parser in sub.choices.items():
            func = parser.get_default("func")
            assert func.__module__ == group.__name__ and func.__name__.startswith("cmd_"), (name, func)


def test_the_layer_table_names_every_module_of_the_cli() -> None:
    row = next(line for line in section("## Layout").splitlines() if line.startswith("| command line |"))
    named = set(quoted(row))
    assert "cli/" in named
    missing = [m.__name__.rsplit(".", 1)[1] for m in cli_modules() if m.__name__.rsplit(".", 1)[1] not in named]
    assert "__init__" in named and not missing, f"the layer table's command line row lacks {missing}"
