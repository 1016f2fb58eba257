"""The metrics document: what evaluating one trained model found, as one typed object.

The evaluate stage writes it (``outputs/metrics/<backbone>.json``, also a run artifact); the
report, the model card and MLflow logging read it, and promotion ranks by the MLflow keys it
logs (:func:`MetricsDocument.mlflow_metrics`). Metric values are fractions in [0, 1]; JSON null
stands for an undefined one (ROC AUC with one class present).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from cnmc.core.atomic import atomic_write_text
from cnmc.core.errors import CnmcError, validated
from cnmc.core.metric_catalogue import HEADLINE, metric_names, mlflow_key, shown_in

Document = TypeVar("Document", bound="FitSummary")
# binary_metrics at one threshold: the registry's metrics, the counts, and per-subject summaries.
ThresholdMetrics = dict[str, float | None]


class _Document(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SplitEvaluation(_Document):
    """:func:`cnmc.metrics.scores.evaluate_split` of one split: at 0.5 (the paper's argmax) and at the
    validation-tuned threshold, per subject, and the 95% bootstrap intervals."""

    at_half: ThresholdMetrics = Field(alias="at_0.5")
    at_tuned: ThresholdMetrics
    threshold: float
    per_subject: dict[str, dict[str, Any]] = {}
    ci95: dict[str, dict[str, list[float | None]]] = {}


class Validation(_Document):
    """Whether validation could fit the temperature and the threshold, what each rule then chose and
    why, and the selected model on it (documents written before the rules lack those fields)."""

    can_judge: bool
    reason: str
    n_all: int
    n_hem: int
    min_images_per_class: int
    at_threshold: ThresholdMetrics
    n_subjects_all: int | None = None
    n_subjects_hem: int | None = None
    threshold_rule: str = ""
    tuned_threshold: float | None = None
    threshold_gain_ci95: list[float] | None = None
    temperature_rule: str = ""
    tta_rule: str = ""


class Calibration(_Document):
    """Temperature scaling (fitted on validation) and how calibrated test probabilities are."""

    temperature: float
    test_ece_before: float
    test_ece_after: float
    test_nll_before: float
    test_nll_after: float
    test_tta_ece: float
    val_nll_before: float
    val_nll_after: float


class PeopleEvaluation(_Document):
    """The model's answer per test person (:func:`cnmc.metrics.patients.people_evaluation`): each person's
    call from the mean p(ALL) of their cells, and people called right out of people."""

    people: int
    right: int
    accuracy: float | None
    accuracy_ci95: list[float] | None
    roc_auc: float | None
    roc_auc_note: str = ""
    not_called: int = 0  # people called `none`: too few of their cells could vote
    per_person: list[dict[str, Any]] = []

    def line(self) -> str:
        """The figure in words: few people, wide intervals."""
        if not self.people:
            return "no test people"
        low, high = self.accuracy_ci95 or [float("nan")] * 2
        auc = f"; AUC over people {self.roc_auc:.2f}" if self.roc_auc is not None else f" ({self.roc_auc_note})"
        unsure = f", {self.not_called} not called (too few of their cells could vote)" if self.not_called else ""
        return f"{self.right} of {self.people} people called right (exact 95% CI {low:.2f}-{high:.2f}){unsure}{auc}"


class FamiliarityEvaluation(_Document):
    """How many cells the model flags as unlike its training cells (:mod:`cnmc.inference.familiarity`):
    on test, the metrics without them, and, with ``--ood-data``, how well the score tells another
    source's cells from the test cells."""

    false_alarm_rate: float  # the cut-off's design rate on unseen people of the training distribution
    test_cells: int
    test_flagged: int
    test_unflagged: SplitEvaluation | None = None  # the reported answer on the cells not flagged
    other_data: str = ""  # the --ood-data folder
    other_cells: int = 0
    other_flagged: int = 0
    other_roc_auc: float | None = None  # ood_score: the other folder's cells against the test cells

    @property
    def test_flagged_share(self) -> float:
        return self.test_flagged / self.test_cells if self.test_cells else 0.0

    def line(self) -> str:
        """The figures in words."""
        text = (
            f"{self.test_flagged} of {self.test_cells} test cells ({self.test_flagged_share:.1%}) flagged as unlike "
            f"the training cells (cut-off: {self.false_alarm_rate:.0%} of unseen training-distribution cells)"
        )
        if self.other_data:
            auc = "n/a" if self.other_roc_auc is None else f"{self.other_roc_auc:.3f}"
            text += (
                f"; cells of {self.other_data}: {self.other_flagged} of {self.other_cells} flagged, "
                f"ROC AUC of the score against the test cells {auc}"
            )
        return text


class FitSummary(_Document):
    """What training found (``fit.json`` beside the weights): read by evaluation and kept in its document."""

    backbone: str
    run_id: str
    weights: str = ""
    best_epoch: int
    epochs_run: int
    epoch_selection: str
    stopped_early: bool
    train_seconds: float
    best_val_f1_macro: float
    store: str = ""  # the image store trained on, for evaluation to judge on the same one
    folds: int = 0  # cross-fitting folds, each a model of the served ensemble (0: one model, holdout validation)
    fold_people: list[dict[str, int]] = []  # per cross-fitting fold: its people of each class ("all", "hem")

    def save(self, path: Path) -> None:
        atomic_write_text(path, self.model_dump_json(indent=2, by_alias=True) + "\n")


class MetricsDocument(FitSummary):
    """Everything one evaluation found, with the training facts it rests on."""

    protocol: str
    data_hash: str
    threshold: float
    validation: Validation
    test: SplitEvaluation
    test_tta: SplitEvaluation
    calibration: Calibration
    tta: bool = False  # the 8-view TTA answer is the reported (and served) one: validation showed it helps
    people: PeopleEvaluation | None = None  # documents written before the per-person call lack it
    familiarity: FamiliarityEvaluation | None = None  # documents written before the flag lack it

    @property
    def validation_scheme(self) -> str:
        """Who judged the model's choices: cross-fitted folds of all training people, or held-out people."""
        v = self.validation
        people = f"{v.n_subjects_all} ALL and {v.n_subjects_hem} Hem people"
        if not self.folds:
            return f"holdout validation: {people} held out of training"
        per_fold = "; ".join(f"fold {k}: {f['all']} ALL, {f['hem']} Hem" for k, f in enumerate(self.fold_people))
        return (
            f"cross-fitting: all {people} of training in {self.folds} folds ({per_fold}), each judged by the "
            f"fold model that never saw them, every choice made on those out-of-fold answers; the served "
            f"model is the mean of the {self.folds} fold models"
        )

    @property
    def reported(self) -> SplitEvaluation:
        """The headline test evaluation: with TTA where the model answers with it, else plain."""
        return self.test_tta if self.tta else self.test

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.model_dump(by_alias=True), indent=2) + "\n")

    def headline(self) -> dict[str, Any]:
        """A dozen numbers for ``dvc exp show`` / ``dvc metrics diff``: the reported test answer, the
        selected model on validation, and the choices the answer rests on."""
        test, val = self.reported.at_tuned, self.validation.at_threshold
        return {
            "test": {k: test.get(k) for k in (*shown_in(HEADLINE), "mean_subject_accuracy")}
            | ({"people_accuracy": self.people.accuracy} if self.people else {}),
            "val": {k: val.get(k) for k in ("roc_auc", "f1_macro")},
            "threshold": self.threshold,
            "temperature": self.calibration.temperature,
            "best_epoch": self.best_epoch,
            "tta": int(self.tta),
        }

    def mlflow_metrics(self) -> dict[str, float]:
        """The run's evaluation metrics by MLflow key: the reported test answer at the reported
        threshold (``test_*``) and at 0.5 (``test_t0.5_*``), with TTA (``test_tta_*``), the selected
        model on validation (``final_val_*``, what promotion ranks), calibration and the threshold."""
        out: dict[str, float] = {}
        for prefix, values in (
            (mlflow_key("test", ""), self.reported.at_tuned),
            ("test_t0.5_", self.reported.at_half),
            ("test_tta_", self.test_tta.at_tuned),
            (mlflow_key("val", ""), self.validation.at_threshold),
        ):
            out |= {
                f"{prefix}{name}": float(v) for name, v in values.items() if name in metric_names() and v is not None
            }
        if self.people and self.people.people:
            out |= {"test_people_n": float(self.people.people), "test_people_right": float(self.people.right)}
            out |= {"test_people_accuracy": float(self.people.accuracy or 0.0)}
            if self.people.roc_auc is not None:
                out["test_people_roc_auc"] = self.people.roc_auc
        if self.familiarity:
            out["test_ood_share"] = self.familiarity.test_flagged_share
            if self.familiarity.other_roc_auc is not None:
                out["ood_data_roc_auc"] = self.familiarity.other_roc_auc
        return out | self.calibration.model_dump() | {"threshold": self.threshold}


def load_document(path: Path | str, kind: type[Document] = MetricsDocument) -> Document:  # type: ignore[assignment]
    """Read a metrics document (or a ``fit.json``); any problem is one line naming the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CnmcError(f"{path}: cannot read {kind.__name__} ({exc.__class__.__name__}: {exc})") from exc
    return validated(kind, raw, str(path), f"a {kind.__name__} must be a JSON object")
