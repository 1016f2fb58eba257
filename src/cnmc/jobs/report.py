"""The comparison table in the form of the paper's Table 2 (Ahmed et al. 2025), ours beside theirs.

Input: one metrics document per trained model (:class:`cnmc.metrics.document.MetricsDocument`).
Output: ``comparison.md`` (what the CLI prints), ``comparison.csv`` and ``comparison.png``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cnmc.core.atomic import atomic_write_text, output_folder
from cnmc.core.config import Params
from cnmc.core.errors import CnmcError
from cnmc.core.metric_catalogue import REPORT, label, shown_in
from cnmc.data.demo import DEMO_DATA_HASH, DEMO_NOTE
from cnmc.metrics.document import MetricsDocument, load_document
from cnmc.plots.evaluation import metric_bars_png

log = logging.getLogger(__name__)

# Ahmed et al. 2025, Table 2, test set, in %. The paper calls P/R/F1 "macro", but they are the
# ALL-class (positive class) binary metrics: B3's 92.02% accuracy and 97.40% recall on 847 ALL /
# 406 Hem cells give TP 825, FN 22, FP 78 -> precision 91.36%, F1 94.30% (see docs/paper.md).
PAPER_METRICS = ("accuracy", "precision_all", "recall_all", "f1_all", "roc_auc")
PAPER_TABLE2: dict[str, dict[str, float]] = {
    "resnet50": dict(zip(PAPER_METRICS, (90.58, 90.37, 96.34, 93.27, 94.38), strict=True)),
    "resnet101": dict(zip(PAPER_METRICS, (89.86, 89.74, 95.99, 92.74, 93.43), strict=True)),
    "efficientnet_b0": dict(zip(PAPER_METRICS, (91.22, 91.27, 96.22, 93.68, 95.14), strict=True)),
    "efficientnet_b1": dict(zip(PAPER_METRICS, (90.82, 90.76, 96.22, 93.38, 95.14), strict=True)),
    "efficientnet_b3": dict(zip(PAPER_METRICS, (92.02, 91.36, 97.40, 94.30, 94.79), strict=True)),
}
PROTOCOLS = {
    "subject": "subject-disjoint: test = unseen subjects",
    "paper": "paper: cell-level 90/10 split, subjects shared — optimistic",
}
# The table's metrics (headers from the metrics registry); values are percentages with two decimals.
NOTES = """# Comparison with Ahmed et al. 2025, Table 2

Test-set metrics in %. Precision, recall and F1 are those of the ALL (positive) class: the paper
calls its P/R/F1 "macro", but its numbers are the ALL-class binary metrics (with 847 ALL / 406 Hem
test cells, B3's numbers imply TP 825, FN 22, FP 78; its true macro F1 would be about 90.5%).
F1 (macro) and balanced accuracy are ours only. "t=0.5" is the paper's argmax rule; the tuned
threshold was chosen on validation data only, on temperature-scaled probabilities (T fitted on
validation). "+ TTA" rows average the probabilities over the 8 flips and 90° rotations of each
image, at the same temperature and threshold.

The paper's protocol splits cells, not subjects, so one person's cells can be in train and test:
its scores are optimistic. Under `subject` the test set holds unseen subjects.
"""


@dataclass(frozen=True)
class Report:
    """The comparison: ``str(report)`` is the markdown table the CLI prints."""

    table: pd.DataFrame  # one row per (protocol, backbone, result), metrics in %
    markdown: str  # the whole comparison.md
    tables_text: str  # the tables (one per protocol) and any warnings
    paths: dict[str, Path] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.tables_text


def _percent(value: Any) -> float:
    return round(float(value) * 100, 2) if value is not None else math.nan


def _rows(path: Path, run: MetricsDocument) -> list[dict[str, Any]]:
    """The paper's row (where it ran the backbone), ours at 0.5 and at the tuned threshold, and ours
    with TTA at the tuned threshold."""
    common = {"protocol": run.protocol, "backbone": run.backbone}
    paper = PAPER_TABLE2.get(run.backbone)
    rows = (
        [
            {
                **common,
                "result": "paper",
                "tta": False,
                "threshold": 0.5,
                **{k: paper.get(k, math.nan) for k in shown_in(REPORT)},
            }
        ]
        if paper
        else []
    )
    tuned = run.threshold
    how = _threshold_how(run)
    tta = "ours + TTA (the model's answer)" if run.tta else "ours + TTA"
    ours = [
        *([(run.test, "at_0.5", 0.5, "ours, t=0.50")] if tuned != 0.5 else []),  # else the next row is the same
        (run.test, "at_tuned", tuned, f"ours, t={tuned:.2f} ({how})"),
        (run.test_tta, "at_tuned", tuned, f"{tta}, t={tuned:.2f} ({how})"),
    ]
    for split, key, threshold, result in ours:
        metrics = split.at_half if key == "at_0.5" else split.at_tuned
        low, high = split.ci95.get(key, {}).get("f1_all", (None, None))
        rows.append(
            {
                **common,
                "result": result,
                "tta": split is run.test_tta,
                "threshold": threshold,
                **{name: _percent(metrics.get(name)) for name in shown_in(REPORT)},
                "f1_all_ci_low": _percent(low),
                "f1_all_ci_high": _percent(high),
                "data_hash": run.data_hash,
                "best_epoch": run.best_epoch,
                "epochs_run": run.epochs_run,
                "train_seconds": run.train_seconds,
                "metrics_file": str(path),
            }
        )
    return rows


def _threshold_how(run: MetricsDocument) -> str:
    """How the reported threshold came about, in a few words."""
    if not run.validation.can_judge:
        return "not tuned: validation too small"
    return "val-tuned" if run.threshold != 0.5 else "0.5: tuning did not earn its place"


def _validation_notes(runs: list[tuple[Path, MetricsDocument]]) -> str:
    """One line per run: who judged its choices (cross-fitted folds or held-out people), and whether
    validation was too small to fit threshold, temperature or epoch."""
    return "\n".join(
        f"- **{run.backbone}**: {run.validation_scheme}."
        + (
            ""
            if run.validation.can_judge
            else f" **Nothing fitted** ({run.validation.reason}): threshold 0.5, temperature 1; "
            f"epoch: {run.epoch_selection}."
        )
        for _, run in runs
    )


def _people_lines(runs: list[tuple[Path, MetricsDocument]]) -> str:
    """Per person: each run's test people called right (mean p(ALL) of their cells at the threshold)."""
    lines = [
        f"- **{run.backbone}**: {run.people.line()}" + (f"; {run.familiarity.line()}" if run.familiarity else "") + "."
        for _, run in runs
        if run.people is not None
    ]
    if not lines:
        return ""
    head = (
        "**Per person** (a person is called ALL when the mean p(ALL) of their cells reaches the threshold; "
        "with this few people the exact intervals are wide):"
    )
    return "\n".join([head, *lines])


def _cell(value: Any) -> str:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return "—" if missing else f"{value:.2f}"


def _markdown_table(rows: pd.DataFrame) -> str:
    has_ci = rows["f1_all_ci_low"].notna().any()
    header = ["Model", "Result", *(label(name) for name in shown_in(REPORT))] + (["F1 (ALL) 95% CI"] if has_ci else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for _, row in rows.iterrows():
        cells = [row["backbone"], row["result"], *(_cell(row[key]) for key in shown_in(REPORT))]
        if has_ci:
            ci = (row["f1_all_ci_low"], row["f1_all_ci_high"])
            cells.append("—" if math.isnan(ci[0]) else f"{ci[0]:.2f}–{ci[1]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _calibration_table(runs: list[tuple[Path, MetricsDocument]]) -> str:
    """Temperature and test ECE / NLL before and after scaling."""
    lines = [
        "Calibration on test (temperature T fitted on validation; ECE: 15 bins, top-label):",
        "",
        "| Model | T | ECE before | ECE after | NLL before | NLL after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for _, run in runs:
        c = run.calibration
        values = [c.temperature, c.test_ece_before, c.test_ece_after, c.test_nll_before, c.test_nll_after]
        lines.append(f"| {run.backbone} | " + " | ".join("—" if math.isnan(v) else f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines)


def _order(protocol: str, backbone: str) -> tuple[bool, str, int, str]:
    """Protocol ``subject`` first; within one, the paper's backbones in its order, then others."""
    names = list(PAPER_TABLE2)
    rank = names.index(backbone) if backbone in names else len(names)
    return protocol != "subject", protocol, rank, backbone


def _warnings(runs: list[tuple[Path, MetricsDocument]]) -> list[str]:
    """Rows that must not be compared directly: mixed protocols, mixed data, duplicate models."""
    out = []
    protocols = sorted({run.protocol for _, run in runs})
    if len(protocols) > 1:
        out.append(f"mixed protocols ({', '.join(protocols)}): compare rows within a protocol only")
    for protocol in protocols:
        group = [(path, run) for path, run in runs if run.protocol == protocol]
        hashes = sorted({run.data_hash for _, run in group})
        if len(hashes) > 1:
            out.append(f"protocol {protocol}: models saw different data ({', '.join(hashes)})")
        backbones = [run.backbone for _, run in group]
        for name in sorted({b for b in backbones if backbones.count(b) > 1}):
            files = ", ".join(str(path) for path, run in group if run.backbone == name)
            out.append(f"protocol {protocol}: {name} appears more than once ({files})")
    return out


def report_backbones(params: Params, metrics_dir: Path, out_dir: Path) -> Report:
    """The report over the metrics files of ``train.backbones`` (the DVC matrix); missing ones are warned about."""
    files = [metrics_dir / f"{name}.json" for name in params.train.backbones]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        log.warning("no metrics yet for %s", ", ".join(missing))
    files = [f for f in files if f.is_file()]
    if not files:
        raise CnmcError(f"{metrics_dir}: no metrics files (run `cnmc train` or `dvc repro` first)")
    return build_report(files, out_dir)


def build_report(metrics_files: list[Path], out_dir: Path) -> Report:
    """Read the trainer's metrics files and write comparison.md/.csv/.png under ``out_dir``."""
    if not metrics_files:
        raise CnmcError("no metrics files given to the report")
    runs: list[tuple[Path, MetricsDocument]] = [(Path(path), load_document(path)) for path in metrics_files]
    runs.sort(key=lambda item: _order(item[1].protocol, item[1].backbone))
    table = pd.DataFrame([row for path, run in runs for row in _rows(path, run)])
    warnings = _warnings(runs)
    for message in warnings:
        log.warning(message)

    sections = []
    for protocol, rows in table.groupby("protocol", sort=False):
        hashes = ", ".join(sorted(rows["data_hash"].dropna().unique()))
        group = [item for item in runs if item[1].protocol == protocol]
        calibration, notes, people = _calibration_table(group), _validation_notes(group), _people_lines(group)
        demo = f" — **demo data**: {DEMO_NOTE}" if hashes == DEMO_DATA_HASH else ""
        sections.append(
            f"### Protocol `{protocol}` — {PROTOCOLS.get(protocol, 'unknown protocol')}\n\n"
            f"Data hash: `{hashes}`{demo}\n\n{_markdown_table(rows)}"
            + (f"\n\n{notes}" if notes else "")
            + (f"\n\n{people}" if people else "")
            + (f"\n\n{calibration}" if calibration else "")
        )
    tables_text = "\n\n".join(sections + [f"**Warning:** {message}" for message in warnings])
    markdown = f"{NOTES}\n{tables_text}\n"

    output_folder(out_dir)
    paths = {"md": out_dir / "comparison.md", "csv": out_dir / "comparison.csv"}
    atomic_write_text(paths["md"], markdown)
    atomic_write_text(paths["csv"], table.to_csv(index=False))
    title = "Test set: ours vs the paper's Table 2" if (table["result"] == "paper").any() else "Test set"
    paths["png"] = metric_bars_png(table, out_dir / "comparison.png", title)
    return Report(table, markdown, tables_text, paths, warnings)
