"""What a promotion did: the version registered, the aliases, and the card (one record that
``cnmc promote`` returns, writes as ``promotion.json`` and renders into the model card)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class PromotionResult:
    """The version registered for the best run of this data and protocol (``candidate_alias`` points
    at it), and what happened to the released alias. ``released``: the call could move ``alias``;
    ``promoted``: the call could and this version holds ``alias`` after it (newly, or already; never
    in a DVC experiment, which cannot release); ``champion_version``: the version ``alias`` points
    at after the call."""

    name: str
    version: str
    run_id: str
    metric: str
    value: float
    data_hash: str
    protocol: str
    backbone: str
    promoted: bool
    reason: str
    alias: str = "champion"
    champion_version: str = ""
    candidate_alias: str = "challenger"
    released: bool = True
    rank_on: str = "val"  # the split whose ``metric`` chose the version
    tracking_store: str = ""  # the tracking store (password masked) whose registry holds the version
    model_card: str = field(default="", repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """What ``promotion.json`` holds (everything but the card's text)."""
        out = asdict(self)
        out.pop("model_card")
        return out
