"""The DVC pipeline, defined once: ``dvc.yaml`` is rendered from here
(``python -m cnmc.jobs.stages``), and a test fails when the files on disk differ from the rendering.

Each stage names its entry module and its data; what it must declare follows by construction:

* **deps**: the stage's data plus every project source file the entry module imports, followed
  to the end (:func:`cnmc.core.imports.code_closure`). A file a stage never runs is never its dep, so
  a serving docstring retrains nothing.
* **params**: every setting of the typed config (:class:`cnmc.core.config.Params`) that the stage's
  code reads, found by following config objects through the code (:class:`_ConfigReads`):
  ``cfg.head_init`` counts where ``cfg`` is a ``TrainConfig``, not where any object has an attribute
  of that name. Settings marked ``runtime_only`` in the config (workers, device) and the stage's
  own matrix list are left out; ``${...}`` in the command is added.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from cnmc.core.config import Params
from cnmc.core.imports import PACKAGE_DIR, code_closure, parsed

PROJECT_DIR = PACKAGE_DIR.parents[1]  # src/cnmc -> the repository
CONFIG_FILE = PACKAGE_DIR / "core" / "config.py"  # defines the settings; reading one happens elsewhere
MATRIX_KEY = "train.backbones"


@dataclass(frozen=True)
class Out:
    """An output path; ``cache=False`` keeps it in git's working tree (small reports, plots)."""

    path: str
    cache: bool = True
    options: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str | dict[str, Any]:
        extra = ({} if self.cache else {"cache": False}) | self.options
        return {self.path: extra} if extra else self.path


@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    entry: str  # the module the command runs
    data: tuple[str, ...] = ()  # data deps (other stages' outputs, the raw data)
    outs: tuple[Out, ...] = ()
    metrics: tuple[Out, ...] = ()
    plots: tuple[Out, ...] = ()
    matrix: bool = False  # one stage per backbone of train.backbones

    def code_deps(self) -> list[str]:
        files, _ = code_closure(self.entry)
        return [path.relative_to(PROJECT_DIR).as_posix() for path in files]

    def params(self) -> list[str]:
        used = settings_read(self.entry)
        interpolated = set(re.findall(r"\$\{(?!item\.)([\w.]+)\}", self.cmd))
        return sorted((used - ({MATRIX_KEY} if self.matrix else set())) | interpolated, key=_param_order)

    def render(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.matrix:
            body["matrix"] = {"backbone": "${" + MATRIX_KEY + "}"}
        body["cmd"] = self.cmd
        body["deps"] = list(self.data) + self.code_deps()
        body["params"] = self.params()
        for name in ("outs", "metrics", "plots"):
            if entries := getattr(self, name):
                body[name] = [out.render() for out in entries]
        return body


def settings_read(entry: str) -> set[str]:
    """``section.key`` (or top-level ``key``) of every setting the closure of ``entry`` reads."""
    files, _ = code_closure(entry)
    read: set[str] = set()
    for path in files:
        if path != CONFIG_FILE:
            read |= _ConfigReads(parsed(path)).settings
    return read


class _ConfigReads:
    """The settings one file reads, found by following the typed config through it.

    A name is a config object when it is annotated with :class:`~cnmc.core.config.Params` or a
    section's class (``cfg: TrainConfig``, also inside ``X | None``), or assigned from one
    (``cfg = params.tune``, ``self.cfg = cfg``, ``params.train.model_copy(...)``). A setting is read
    where such an object's field is (``cfg.lr``, ``params.train.lr``, ``params.seed``). A top-level
    setting also counts where a function takes it as an argument of its name (``seed``): the
    command line hands it in. ``torch.channels_last`` or ``args.lr`` are no settings.
    """

    def __init__(self, tree: ast.Module) -> None:
        self.sections: dict[str, type[BaseModel]] = {
            name: info.annotation
            for name, info in Params.model_fields.items()
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
        }
        self.classes = {cls.__name__: name for name, cls in self.sections.items()} | {Params.__name__: ""}
        self.top_level = set(Params.model_fields) - set(self.sections)
        self.bound: dict[str, str] = {}  # a name (or self.attr) -> its section ("" for the whole Params)
        self.settings: set[str] = set()
        for _ in range(3):  # assignments may chain: params -> self.params -> cfg
            for node in ast.walk(tree):
                self._bind(node)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                self._read(node)
            elif isinstance(node, ast.arg) and node.arg in self.top_level:
                self.settings.add(node.arg)

    def _bind(self, node: ast.AST) -> None:
        if isinstance(node, ast.arg) and node.annotation is not None:
            for name in ast.walk(node.annotation):
                if isinstance(name, ast.Name) and name.id in self.classes:
                    self.bound[node.arg] = self.classes[name.id]
        elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                pairs = (
                    zip(target.elts, node.value.elts, strict=False)
                    if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
                    else [(target, node.value)]
                )
                for one, value in pairs:
                    section, key = self._section_of(value), _key(one)
                    if section is not None and key is not None:
                        self.bound[key] = section

    def _section_of(self, node: ast.AST) -> str | None:
        """The section ``node`` evaluates to ("" for Params), or None where it is no config object."""
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "model_copy":
            return self._section_of(node.func.value)
        key = _key(node)
        if key is not None and key in self.bound:
            return self.bound[key]
        if isinstance(node, ast.Attribute) and self._section_of(node.value) == "" and node.attr in self.sections:
            return node.attr
        return None

    def _read(self, node: ast.Attribute) -> None:
        section = self._section_of(node.value)
        if section == "" and node.attr in self.top_level:
            self.settings.add(node.attr)
        elif section and node.attr in self.sections[section].model_fields:
            extra = self.sections[section].model_fields[node.attr].json_schema_extra
            if not _runtime_only(extra):
                self.settings.add(f"{section}.{node.attr}")


def _key(node: ast.AST) -> str | None:
    """``name`` or ``self.attr``: what an assignment can bind."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return f"self.{node.attr}"
    return None


def _runtime_only(extra: Any) -> bool:
    return isinstance(extra, dict) and bool(extra.get("runtime_only"))


def _param_order(key: str) -> tuple[int, int]:
    """Params in the order params.yaml holds them."""
    order = list(Params().model_dump())
    section, _, name = key.partition(".")
    fields = list(getattr(Params(), section).model_dump()) if name else []
    return order.index(section), fields.index(name) if name else -1


# `dvc plots show` shows PNGs only: a data file's plot is drawn by vega, which DVC's page loads from a
# CDN, and so draws nothing on an offline machine (a hospital's). The data behind each PNG (ROC points,
# confusion counts, the per-epoch history) stays an out that git tracks, for anyone who wants to redraw it.

PIPELINE = (
    Stage(
        "manifest",
        "cnmc manifest ${data_dir} -o outputs/manifest.csv --report outputs/data_report.json",
        "cnmc.data.manifest",
        data=("${data_dir}",),
        outs=(Out("outputs/manifest.csv"), Out("outputs/data_report.json", cache=False)),
    ),
    Stage(
        "split",
        "cnmc split --manifest outputs/manifest.csv --out-dir outputs/splits --report outputs/split_report.json",
        "cnmc.data.split",
        data=("outputs/manifest.csv",),
        outs=(Out("outputs/splits"), Out("outputs/split_report.json", cache=False)),
    ),
    Stage(
        "augment",
        "cnmc augment --splits-dir outputs/splits --out-dir outputs/images --preview outputs/plots/augment_preview.png",
        "cnmc.data.augment",
        data=("outputs/splits",),
        outs=(Out("outputs/images"),),
        plots=(Out("outputs/plots/augment_preview.png", cache=False),),
    ),
    Stage(
        "train",
        "cnmc train --backbone ${item.backbone} --no-evaluate",
        "cnmc.jobs.train",
        data=("outputs/images",),
        matrix=True,
        outs=(Out("outputs/models/${item.backbone}"), Out("outputs/curves/${item.backbone}/history.csv", cache=False)),
        plots=(Out("outputs/curves/${item.backbone}/curves.png", cache=False),),
    ),
    Stage(
        "evaluate",
        "cnmc evaluate --backbone ${item.backbone}",
        "cnmc.jobs.evaluate",
        data=("outputs/images", "outputs/models/${item.backbone}"),
        matrix=True,
        outs=(
            Out("outputs/evaluation/${item.backbone}"),
            Out("outputs/metrics/${item.backbone}.json", cache=False),
            Out("outputs/plots/${item.backbone}/roc.csv", cache=False),
            Out("outputs/plots/${item.backbone}/confusion.json", cache=False),
        ),
        metrics=(Out("outputs/headline/${item.backbone}.json", cache=False),),
        plots=(
            *(
                Out(f"outputs/plots/${{item.backbone}}/{name}.png", cache=False)
                for name in ("roc", "confusion", "reliability", "gradcam")
            ),
        ),
    ),
    Stage(
        "report",
        "cnmc report --metrics-dir outputs/metrics --out-dir outputs/report",
        "cnmc.jobs.report",
        data=("outputs/metrics",),
        outs=(Out("outputs/report", cache=False),),
    ),
    Stage(
        "promote",
        "cnmc promote --from-pipeline --out-dir registry",
        "cnmc.jobs.promote",
        data=("outputs/metrics", "outputs/report"),
        outs=(Out("registry/promotion.json", cache=False), Out("registry/model_card.md", cache=False)),
    ),
)
FILES = {
    "dvc.yaml": (
        PIPELINE,
        "The pipeline: raw data (data/, tracked by data.dvc) -> manifest -> split -> augment\n"
        "-> train@<backbone> (fit) -> evaluate@<backbone> -> report -> promote.",
    ),
}
HEADER = (
    "# Generated by `python -m cnmc.jobs.stages` from src/cnmc/jobs/stages.py: edit that, not this file.\n"
    "# deps = each stage's data + the source files its code imports; params = the settings it reads.\n"
)


def render(stages: tuple[Stage, ...], about: str) -> str:
    body = yaml.safe_dump({"stages": {s.name: s.render() for s in stages}}, sort_keys=False, width=120)
    return HEADER + "".join(f"# {line}\n" for line in about.splitlines()) + body


def write_all(root: Path = PROJECT_DIR) -> list[Path]:
    written = []
    for name, (stages, about) in FILES.items():
        path = root / name
        path.write_text(render(stages, about))
        written.append(path)
    return written


if __name__ == "__main__":
    for written in write_all():
        print(f"wrote {written}")
