"""``cnmc promote``: register the best run and move its aliases (:mod:`cnmc.tracking.model_registry`),
then render its model card (:mod:`cnmc.jobs.model_card`), attach it to the run (``model_card.md``)
and to the version (its description), and write ``promotion.json`` and ``model_card.md``.

The card is rendered after the aliases moved, so it says which aliases the version holds.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from mlflow.tracking import MlflowClient

from cnmc.core.atomic import atomic_write_text
from cnmc.core.config import Params, PromoteConfig
from cnmc.jobs.model_card import load_metrics_document, render_model_card
from cnmc.tracking.model_registry import register_best
from cnmc.tracking.promotion import PromotionResult
from cnmc.tracking.provenance import data_hash, tracking_uri

CARD_FILE = "model_card.md"
MAX_DESCRIPTION = 5000  # characters of a model version's description in MLflow's schema
RESULT_FILE = "promotion.json"


def promote(
    cfg: PromoteConfig, protocol: str, dhash: str, client: MlflowClient | None = None, release: bool = True
) -> PromotionResult:
    """:func:`~cnmc.tracking.model_registry.register_best`, then the model card on the run and the version."""
    client = client or MlflowClient(tracking_uri=tracking_uri())
    result = register_best(cfg, protocol, dhash, client, release=release)
    run = client.get_run(result.run_id)
    card = render_model_card(result, run, load_metrics_document(client, run))
    client.log_text(result.run_id, card, CARD_FILE)
    client.update_model_version(result.name, result.version, description=version_description(card, result.run_id))
    return replace(result, model_card=card)


def version_description(card: str, run_id: str) -> str:
    """The card as a version's description, within MLflow's column (``VARCHAR(5000)`` on PostgreSQL,
    which enforces it; SQLite does not): cut at a line where longer, saying where the whole card is."""
    if len(card) <= MAX_DESCRIPTION:
        return card
    tail = f"\n\n... (cut to fit the registry: the whole card is `{CARD_FILE}` of run `{run_id}`)"
    head = card[: MAX_DESCRIPTION - len(tail)]
    return head[: head.rfind("\n")] + tail


def pipeline_may_release(cfg: PromoteConfig) -> bool:
    """Whether the promote stage releases: where ``promote.pipeline_releases`` says so, and never in
    a DVC experiment (an experiment is not a release)."""
    return cfg.pipeline_releases and not os.environ.get("DVC_EXP_NAME")


def promote_and_write(params: Params, out_dir: Path, release: bool = True) -> PromotionResult:
    """``cnmc promote``: :func:`promote` under ``params`` on the current data, then :func:`write_promotion`."""
    result = promote(params.promote, params.split.protocol, data_hash(), release=release)
    write_promotion(result, out_dir)
    return result


def write_promotion(result: PromotionResult, out_dir: Path | str) -> Path:
    """Write ``out_dir/promotion.json`` and ``out_dir/model_card.md``; return the JSON's path."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / CARD_FILE, result.model_card)
    path = out_dir / RESULT_FILE
    atomic_write_text(path, json.dumps(result.to_json(), indent=2) + "\n")
    return path
