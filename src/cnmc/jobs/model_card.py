"""The model card of a registered version: what the model is, what data and protocol its test
numbers come from, those numbers with bootstrap 95% intervals, and what it must not be used for.

``cnmc promote`` attaches it to the version (description), to the run (``model_card.md``) and
writes it next to ``registry/champion.json``.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnmc.core.atomic import atomic_write_text
from cnmc.core.errors import CnmcError
from cnmc.core.metric_catalogue import CARD, INTERVAL, label, shown_in
from cnmc.data.demo import DEMO_DATA_HASH, DEMO_NOTE
from cnmc.inference.schema import CELL, REQUEST_COLUMN, markdown_table
from cnmc.metrics.document import FamiliarityEvaluation, MetricsDocument, PeopleEvaluation, load_document

if TYPE_CHECKING:
    from cnmc.tracking.promotion import PromotionResult

log = logging.getLogger(__name__)

SMALL_TEST_SET = 500  # cells; below this the card warns that the intervals are wide
# The card's metrics, in its order (labels from the metrics registry).
_SPLIT_NAMES = {"val": "validation", "test": "test"}
PROTOCOLS = {
    "subject": (
        "**subject-disjoint** (`subject`): no person's cells are on both sides of a split. Validation "
        "is by whole people of the training folds (cross-fitted, or held out); the test set is the "
        "labelled preliminary-phase set (unseen subjects), as in the ISBI 2019 challenge, or held-out "
        "subjects without one. The "
        "test numbers estimate performance on cells of new people."
    ),
    "paper": (
        "**the paper's protocol** (`paper`): training folds and preliminary set merged and split 90/10 "
        "at the cell level (Ahmed et al. 2025). Cells of one person land in both train and test, so "
        "the model is tested partly on people it has seen: the test numbers are optimistic (subject "
        "leakage) and comparable with the paper's Table 2, not an estimate for new patients."
    ),
}


def load_metrics_document(client: MlflowClient, run: Run) -> MetricsDocument:
    """The run's metrics document (the ``<backbone>.json`` artifact its evaluation logged)."""
    backbone = run.data.tags.get("backbone", "")
    name = f"{backbone}.json"
    with tempfile.TemporaryDirectory() as tmp:
        path = _download(client, run.info.run_id, name, tmp) if backbone else None
        if path is None or not path.is_file():
            raise CnmcError(
                f"run {run.info.run_id} has no metrics document {name!r}: evaluate it first "
                f"(`cnmc evaluate --backbone {backbone or '<backbone>'}`)"
            )
        return load_document(path)


def render_model_card(result: PromotionResult, run: Run, metrics_doc: MetricsDocument) -> str:
    """The card as Markdown."""
    tags, params = run.data.tags, run.data.params
    reported = metrics_doc.reported
    tuned, at_half, ci = reported.at_tuned, reported.at_half, reported.ci95
    threshold = metrics_doc.threshold
    started = datetime.fromtimestamp((run.info.start_time or 0) / 1000, tz=UTC)
    n, n_subjects = tuned.get("n"), tuned.get("n_subjects")
    demo = result.data_hash == DEMO_DATA_HASH

    lines = [
        f"# Model card: {result.name} v{result.version}",
        "",
        "ALL-vs-Hem classifier for single segmented white-blood-cell images (C-NMC 2019): "
        "probability that a cell is a leukemic blast (ALL) rather than a normal B-lymphocyte (Hem).",
        "",
        "## Model",
        f"- Registered model: `{result.name}`, version {result.version} (`models:/{result.name}/{result.version}`) "
        f"in `{result.tracking_store or 'the project store'}`; " + _aliases(result),
        f"- Backbone: `{result.backbone}` ({_pretrained(params)}), fine-tuned end to end",
        f"- MLflow run: `{result.run_id}` ({tags.get('mlflow.runName', 'unnamed')}, started "
        f"{started:%Y-%m-%d %H:%M} UTC)",
        f"- Git commit: `{tags.get('git_commit', 'unknown')}`",
        f"- Training: {_training(params)}",
        f"- Selected by: {_SPLIT_NAMES.get(result.rank_on, result.rank_on)} {result.metric}"
        + ("" if result.metric == "roc_auc" else " at the reported threshold")
        + f" = {_fmt(result.value)}"
        + (
            " (the test metrics below played no part in the choice)"
            if result.rank_on == "val"
            else " (the test set chose the version: its figures below are optimistic)"
        ),
        "",
        "## Data and protocol",
        f"- Data hash (`data.dvc` md5 of `data/`): `{result.data_hash}`"
        + (" (the shipped demo subset of real cells)" if demo else ""),
        f"- Split protocol: {PROTOCOLS.get(result.protocol, f'`{result.protocol}`')}",
        f"- Test set: {_count(n, 'cell')}"
        + (f" from {_count(n_subjects, 'subject')}" if n_subjects else "")
        + (
            f" ({_count(tuned['n_all'], 'ALL cell')}, {_count(tuned['n_hem'], 'Hem cell')})" if "n_all" in tuned else ""
        ),
        "",
        "## Test metrics",
        f"Positive class: ALL. Bootstrap 95% intervals over cells, for {', '.join(shown_in(INTERVAL))}.",
        "",
        f"| Metric | At the reported threshold ({threshold:.3f}{'' if threshold == 0.5 else ', tuned on validation'}) "
        "| At 0.5 (the paper's argmax) |",
        "|---|---|---|",
    ]
    for key in shown_in(CARD):
        if key in tuned or key in at_half:
            lines.append(
                f"| {label(key)} | {_cell(tuned, ci.get('at_tuned'), key)} | {_cell(at_half, ci.get('at_0.5'), key)} |"
            )
    if "mean_subject_accuracy" in tuned:
        lines += ["", f"Mean per-subject accuracy at the reported threshold: {_fmt(tuned['mean_subject_accuracy'])}."]
    if metrics_doc.people is not None:
        lines += ["", "## Per person", _people_section(metrics_doc.people)]
    if metrics_doc.familiarity is not None:
        lines += ["", "## Cells it should not judge", _familiarity_section(metrics_doc.familiarity)]
    lines += [
        "",
        "## Decision threshold",
        f"A cell is called ALL when `prob_all >= {threshold:.4f}`. "
        + threshold_note(metrics_doc)
        + " 0.5 is the paper's argmax rule. The served model applies this threshold and returns "
        "`prob_all`, so a user can apply another one.",
        "",
        "## Intended use",
        "- Research and teaching: reproducing and extending the C-NMC / Ahmed et al. 2025 experiments, "
        "comparing backbones and protocols.",
        "- **Not for clinical diagnosis or any decision about a patient.** It is not a medical device, "
        "was not validated clinically, and classifies pre-segmented single cells, not a patient.",
        "- Input: one segmented cell on a black background per image (as in C-NMC), base64-encoded.",
        "",
        "## Known limitations",
        "- Single-cell crops from one data set (C-NMC 2019), one lab and scanner, with its staining and "
        "segmentation: other labs, stains, microscopes or segmenters are a domain shift the numbers do "
        "not cover.",
        "- Stain and domain shift also act between people: per-subject stain differs, so accuracy varies by subject.",
        "- Subject leakage under the paper protocol: cells of one person in train and test inflate the "
        "scores"
        + (
            " (this version was evaluated that way)."
            if result.protocol == "paper"
            else "; this version uses the subject-disjoint protocol, which avoids it."
        ),
        "- The bootstrap intervals resample cells, but cells of one subject are correlated: the intervals "
        "ignore subject clustering and are too narrow for claims about new patients.",
    ]
    if demo:
        lines.append(f"- **Demo data**: this data hash is {DEMO_NOTE}")
    if isinstance(n, (int, float)) and n < SMALL_TEST_SET:
        lines.append(f"- Small test set ({_count(n, 'cell')}): the intervals are wide.")
    lines += [
        "",
        "## How to use",
        "```python",
        "import base64, mlflow, pandas as pd",
        "",
        f'model = mlflow.pyfunc.load_model("models:/{result.name}@{result.alias}")'
        f"  # this version: models:/{result.name}/{result.version}",
        'image = base64.b64encode(open("cell.bmp", "rb").read()).decode()',
        f'model.predict(pd.DataFrame({{"{REQUEST_COLUMN}": [image]}}))',
        "```",
        "",
        "The answer, one row a cell:",
        "",
        markdown_table(CELL),
        "",
    ]
    return "\n".join(lines)


def write_model_card(result: PromotionResult, run: Run, metrics_doc: MetricsDocument, path: Path | str) -> Path:
    """Render the card and write it to ``path``."""
    path = Path(path)
    atomic_write_text(path, render_model_card(result, run, metrics_doc))
    return path


def _download(client: MlflowClient, run_id: str, name: str, dst: str) -> Path | None:
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # one small file: no progress bar in the CLI's output
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        return Path(client.download_artifacts(run_id, name, dst_path=dst))
    except (MlflowException, OSError) as exc:
        log.info("run %s has no artifact %s (%s)", run_id, name, exc.__class__.__name__)
        return None
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _familiarity_section(familiar: FamiliarityEvaluation) -> str:
    """What the model flags, and what its numbers are without the flagged cells."""
    unflagged = familiar.test_unflagged.at_tuned if familiar.test_unflagged else {}
    without = (
        f" Without them: ROC AUC {_fmt(unflagged.get('roc_auc'))}, balanced accuracy "
        f"{_fmt(unflagged.get('balanced_accuracy'))}, macro F1 {_fmt(unflagged.get('f1_macro'))}."
        if unflagged
        else ""
    )
    return (
        "Every answer carries `ood_score` (how unlike the training cells the model finds a cell: the "
        "Mahalanobis distance of its features to the nearer class, over a cut-off set on people the model "
        "did not train on) and `ood` (above 1, or an image that is blank, uniform, noise or a strip). A flagged "
        f"cell does not vote in a person's call. {familiar.line()}.{without}"
    )


def _people_section(people: PeopleEvaluation) -> str:
    """The call per test person, worded for what it is: few people, wide intervals."""
    rows = [
        f"| {p['subject']} | {p['label']} | {p['cells']} | {p['mean_prob_all']:.2f} "
        f"[{p['ci95_low']:.2f}, {p['ci95_high']:.2f}] | {p['share_called_all']:.2f} | {p['call']} |"
        for p in people.per_person
    ]
    return "\n".join(
        [
            "A person is called ALL when the mean p(ALL) of their cells reaches the threshold. "
            f"{people.line()}. With this few people the interval is wide: read it before the accuracy.",
            "",
            "| Person | Truth | Cells | Mean p(ALL) [bootstrap 95% CI over cells] | Share of cells called ALL | Call |",
            "|---|---|---:|---|---:|---|",
            *rows,
        ]
    )


def threshold_note(doc: MetricsDocument) -> str:
    """Whether validation could fit threshold and temperature."""
    scheme = f"Validation: {doc.validation_scheme}."
    if doc.validation.can_judge:
        return (
            f"{scheme} Chosen on validation (never on test), each only where it earns its place over "
            f"whole people: {doc.validation.reason}."
        )
    return f"{scheme} **Nothing was fitted on validation** ({doc.validation.reason}): threshold 0.5 and temperature 1."


def _fmt(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(number) else f"{number:.3f}"


def _cell(values: dict[str, Any], cis: dict[str, Any] | None, key: str) -> str:
    if key not in values:
        return "n/a"
    text = _fmt(values[key])
    interval = (cis or {}).get(key)
    if interval and len(interval) == 2 and text != "n/a":
        low, high = interval
        if not (math.isnan(float(low)) or math.isnan(float(high))):
            text += f" [{float(low):.3f}, {float(high):.3f}]"
    return text


def _count(n: Any, noun: str) -> str:
    if not isinstance(n, (int, float)) or (isinstance(n, float) and math.isnan(n)):
        return f"unknown number of {noun}s"
    return f"{int(n)} {noun}{'' if int(n) == 1 else 's'}"


def _aliases(result: PromotionResult) -> str:
    """Which aliases the version holds after the promotion, and whether it was a release."""
    held = [f"`{result.candidate_alias}`"] + (
        [f"`{result.alias}`"] if result.champion_version == result.version else []
    )
    release = "" if result.released else f" (not a release: `{result.alias}` was left alone)"
    return f"aliases {', '.join(held)}{release}"


def _pretrained(params: dict[str, str]) -> str:
    weights = params.get("weights")
    if params.get("train.pretrained") == "False" or weights == "random":
        return "random initialisation"
    return f"ImageNet-pretrained, weights: {weights}" if weights else "ImageNet-pretrained"


def _training(params: dict[str, str]) -> str:
    parts = [
        f"{label} {params[key]}"
        for key, label in (
            ("train.epochs", "max epochs"),
            ("train.lr", "Adam lr"),
            ("train.batch_size", "batch"),
            ("augment.image_size", "image size"),
            ("augment.per_class", "images per class after balancing"),
            ("augment.strength", "augmentation strength"),
            ("seed", "seed"),
        )
        if key in params
    ]
    return ", ".join(parts) if parts else "settings not logged"
