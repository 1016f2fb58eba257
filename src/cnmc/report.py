"""The comparison table in the form of the paper's Table 2 (Ahmed et al. 2025), ours beside theirs.

Input: one metrics JSON per trained model, written by the trainer (schema: ``MetricsFile``).
Output: ``comparison.md`` (what the CLI prints), ``comparison.csv`` and ``comparison.png``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import pandas as pd

from cnmc.atomic import atomic_write_text
from cnmc.data.demo import DEMO_DATA_HASH, DEMO_NOTE
from cnmc.errors import CnmcError
from cnmc.plots import metric_bars_png

log = logging.getLogger(__name__)

# Ahmed et al. 2025, Table 2, test set, in %. The paper calls P/R/F1 "macro", but they are the
# ALL-class (positive class) binary metrics: B3's 92.02% accuracy and 97.40% recall on 847 ALL /
# 406 Hem cells give TP 825, FN 22, FP 78 -> precision 91.36%, F1 94.30% (see the README, "The
# paper, and what we report differently").
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
# Column key -> markdown header; values are percentages with two decimals.
COLUMNS = {
    "accuracy": "Accuracy",
    "precision_all": "Precision (ALL)",
    "recall_all": "Recall (ALL)",
    "f1_all": "F1 (ALL)",
    "roc_auc": "AUC",
    "f1_macro": "F1 (macro)",
    "balanced_accuracy": "Balanced acc.",
}
THRESHOLD_KEYS = ("at_0.5", "at_tuned")
_NUMBER = (int, float, type(None))  # JSON null / NaN stand for an undefined metric (AUC, one class)
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


# ``test`` of a metrics file: cnmc.evaluate.evaluate_split's output. "at_0.5" and "at_tuned" are
# binary_metrics at 0.5 (the paper's argmax) and at the validation-tuned threshold; the optional
# "ci95" is {"at_0.5": {"f1_all": [low, high], ...}, "at_tuned": {...}}.
SplitMetrics = TypedDict(
    "SplitMetrics",
    {
        "at_0.5": dict[str, float],
        "at_tuned": dict[str, float],
        "ci95": NotRequired[dict[str, dict[str, list[float]]]],
    },
)


class _OptionalMetrics(TypedDict, total=False):
    """Keys of newer metrics files; the report works without them."""

    test_tta: SplitMetrics  # the same evaluation with test-time augmentation (same threshold)
    validation: dict[str, Any]  # can_judge, reason, n_all, n_hem: whether threshold and T were fitted
    calibration: dict[str, float]  # temperature, test_ece_before/after, test_nll_before/after


class MetricsFile(_OptionalMetrics):
    """What the trainer writes per model (e.g. ``outputs/metrics/<backbone>.json``).

    ``test`` is ``cnmc.evaluate.evaluate_split`` on the test set (extra keys such as
    ``per_subject`` are fine). Metric values are fractions in [0, 1]; the report shows percent.
    """

    backbone: str  # timm-style name; PAPER_TABLE2 keys get the paper's row beside them
    protocol: str  # "subject" or "paper" (split.protocol)
    data_hash: str  # identifies the data/splits the model saw; rows to compare must share it
    threshold: float  # tuned on validation data only
    test: SplitMetrics
    best_epoch: int
    epochs_run: int
    train_seconds: float


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


def load_metrics_file(path: Path) -> MetricsFile:
    """Read and check one metrics file; any problem is a CnmcError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CnmcError(f"{path}: cannot read metrics file ({exc})") from exc
    if not isinstance(data, dict):
        raise CnmcError(f"{path}: metrics file must hold a JSON object")
    missing = [key for key in MetricsFile.__required_keys__ if key not in data]
    if missing:
        raise CnmcError(f"{path}: metrics file lacks {', '.join(sorted(missing))}")
    if not isinstance(data["threshold"], int | float):
        raise CnmcError(f"{path}: threshold must be a number, not {data['threshold']!r}")
    for section in ("test", "test_tta") if "test_tta" in data else ("test",):
        for key in THRESHOLD_KEYS:
            metrics = data[section].get(key) if isinstance(data[section], dict) else None
            if not isinstance(metrics, dict):
                raise CnmcError(f"{path}: metrics file lacks {section}.{key}")
            bad = [name for name in COLUMNS if not isinstance(metrics.get(name, ""), _NUMBER)]
            if bad:
                raise CnmcError(f"{path}: {section}.{key} lacks numbers for {', '.join(bad)}")
    calibration = data.get("calibration", {})
    if not isinstance(calibration, dict) or not all(isinstance(v, _NUMBER) for v in calibration.values()):
        raise CnmcError(f"{path}: calibration must map names to numbers")
    return data  # type: ignore[return-value]


def _percent(value: Any) -> float:
    return round(float(value) * 100, 2) if value is not None else math.nan


def _rows(path: Path, run: MetricsFile) -> list[dict[str, Any]]:
    """The paper's row (NaN where it lacks the backbone), ours at 0.5 and at the tuned threshold,
    and, when the run has it, ours with TTA at the tuned threshold."""
    common = {"protocol": run["protocol"], "backbone": run["backbone"]}
    paper = PAPER_TABLE2.get(run["backbone"], {})
    rows = [
        {
            **common,
            "result": "paper",
            "tta": False,
            "threshold": 0.5 if paper else math.nan,
            **{key: paper.get(key, math.nan) for key in COLUMNS},
        }
    ]
    tuned = float(run["threshold"])
    how = "val-tuned" if _validation_judged(run) else "not tuned: validation too small"
    ours = [("test", "at_0.5", 0.5, "ours, t=0.50"),
            ("test", "at_tuned", tuned, f"ours, t={tuned:.2f} ({how})")]
    if "test_tta" in run:
        ours.append(("test_tta", "at_tuned", tuned, f"ours + TTA, t={tuned:.2f} ({how})"))
    for section, key, threshold, result in ours:
        split: dict[str, Any] = run[section]  # type: ignore[literal-required]
        low, high = split.get("ci95", {}).get(key, {}).get("f1_all", (None, None))
        rows.append(
            {
                **common,
                "result": result,
                "tta": section == "test_tta",
                "threshold": threshold,
                **{name: _percent(split[key][name]) for name in COLUMNS},
                "f1_all_ci_low": _percent(low),
                "f1_all_ci_high": _percent(high),
                "data_hash": run["data_hash"],
                "best_epoch": run["best_epoch"],
                "epochs_run": run["epochs_run"],
                "train_seconds": run["train_seconds"],
                "metrics_file": str(path),
            }
        )
    return rows


def _validation_judged(run: MetricsFile) -> bool:
    return bool(run.get("validation", {}).get("can_judge", True))


def _validation_notes(runs: list[tuple[Path, MetricsFile]]) -> str:
    """One line per run whose validation set was too small to fit threshold, temperature or epoch."""
    return "\n".join(
        f"- **{run['backbone']}: nothing fitted on validation** ({run['validation']['reason']}): "
        "threshold 0.5, temperature 1, the last epoch kept."
        for _, run in runs if not _validation_judged(run)
    )


def _cell(value: Any) -> str:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return "—" if missing else f"{value:.2f}"


def _markdown_table(rows: pd.DataFrame) -> str:
    has_ci = rows["f1_all_ci_low"].notna().any()
    header = ["Model", "Result", *COLUMNS.values()] + (["F1 (ALL) 95% CI"] if has_ci else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for _, row in rows.iterrows():
        cells = [row["backbone"], row["result"], *(_cell(row[key]) for key in COLUMNS)]
        if has_ci:
            ci = (row["f1_all_ci_low"], row["f1_all_ci_high"])
            cells.append("—" if math.isnan(ci[0]) else f"{ci[0]:.2f}–{ci[1]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _calibration_table(runs: list[tuple[Path, MetricsFile]]) -> str:
    """Temperature and test ECE / NLL before and after scaling, for the runs that have them."""
    rows = [run for _, run in runs if run.get("calibration")]
    if not rows:
        return ""
    lines = ["Calibration on test (temperature T fitted on validation; ECE: 15 bins, top-label):", "",
             "| Model | T | ECE before | ECE after | NLL before | NLL after |", "|---|---:|---:|---:|---:|---:|"]
    for run in rows:
        c = run["calibration"]
        values = [c.get(k) for k in ("temperature", "test_ece_before", "test_ece_after",
                                     "test_nll_before", "test_nll_after")]
        cells = ["—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
                 for v in values]
        lines.append(f"| {run['backbone']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _order(protocol: str, backbone: str) -> tuple[bool, str, int, str]:
    """Protocol ``subject`` first; within one, the paper's backbones in its order, then others."""
    names = list(PAPER_TABLE2)
    rank = names.index(backbone) if backbone in names else len(names)
    return protocol != "subject", protocol, rank, backbone


def _warnings(runs: list[tuple[Path, MetricsFile]]) -> list[str]:
    """Rows that must not be compared directly: mixed protocols, mixed data, duplicate models."""
    out = []
    protocols = sorted({run["protocol"] for _, run in runs})
    if len(protocols) > 1:
        out.append(f"mixed protocols ({', '.join(protocols)}): compare rows within a protocol only")
    for protocol in protocols:
        group = [(path, run) for path, run in runs if run["protocol"] == protocol]
        hashes = sorted({run["data_hash"] for _, run in group})
        if len(hashes) > 1:
            out.append(f"protocol {protocol}: models saw different data ({', '.join(hashes)})")
        backbones = [run["backbone"] for _, run in group]
        for name in sorted({b for b in backbones if backbones.count(b) > 1}):
            files = ", ".join(str(path) for path, run in group if run["backbone"] == name)
            out.append(f"protocol {protocol}: {name} appears more than once ({files})")
    return out


def build_report(metrics_files: list[Path], out_dir: Path) -> Report:
    """Read the trainer's metrics files and write comparison.md/.csv/.png under ``out_dir``."""
    if not metrics_files:
        raise CnmcError("no metrics files given to the report")
    runs = [(Path(path), load_metrics_file(Path(path))) for path in metrics_files]
    runs.sort(key=lambda item: _order(item[1]["protocol"], item[1]["backbone"]))
    table = pd.DataFrame([row for path, run in runs for row in _rows(path, run)])
    warnings = _warnings(runs)
    for message in warnings:
        log.warning(message)

    sections = []
    for protocol, rows in table.groupby("protocol", sort=False):
        hashes = ", ".join(sorted(rows["data_hash"].dropna().unique()))
        group = [item for item in runs if item[1]["protocol"] == protocol]
        calibration, notes = _calibration_table(group), _validation_notes(group)
        demo = f" — **demo data**: {DEMO_NOTE}" if hashes == DEMO_DATA_HASH else ""
        sections.append(
            f"### Protocol `{protocol}` — {PROTOCOLS.get(protocol, 'unknown protocol')}\n\n"
            f"Data hash: `{hashes}`{demo}\n\n{_markdown_table(rows)}"
            + (f"\n\n{notes}" if notes else "")
            + (f"\n\n{calibration}" if calibration else "")
        )
    tables_text = "\n\n".join(sections + [f"**Warning:** {message}" for message in warnings])
    markdown = f"{NOTES}\n{tables_text}\n"

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "comparison.md", "csv": out_dir / "comparison.csv"}
    atomic_write_text(paths["md"], markdown)
    atomic_write_text(paths["csv"], table.to_csv(index=False))
    paths["png"] = metric_bars_png(table, out_dir / "comparison.png", "Test set: ours vs the paper")
    return Report(table, markdown, tables_text, paths, warnings)
