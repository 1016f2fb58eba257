"""What prediction needs besides the weights (``model.json``): written by training, calibrated by
evaluation, carried by the served model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cnmc.core.atomic import atomic_write_text
from cnmc.core.config import Crop, Framing
from cnmc.inference.forward import Colour


@dataclass(frozen=True)
class ModelSpec:
    """The backbone, the input size, colour and normalisation, and the decision rule of one model."""

    backbone: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    threshold: float = 0.5
    temperature: float = 1.0
    colour: Colour = "rgb"  # how the model sees colour (cnmc.inference.forward.recolour); models saved before it: rgb
    tta: bool = False  # the 8-view test-time augmentation is this model's default answer (train.test_time_augmentation)
    crop: Crop = "frame"  # what the model sees of an image (augment.crop); models saved before it: the frame
    crop_margin: float = 0.1  # with crop cell: the margin around the cell (augment.crop_margin)

    @property
    def framing(self) -> Framing:
        """How an image sent to this model is framed and sized, as its training images were."""
        return Framing(self.image_size, self.crop, self.crop_margin)

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelSpec:
        raw = json.loads(Path(path).read_text())
        return cls(**{**raw, "mean": tuple(raw["mean"]), "std": tuple(raw["std"])})
