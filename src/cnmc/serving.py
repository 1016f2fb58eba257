"""The served model: an MLflow pyfunc that holds the weights and the preprocessing.

A client sends encoded image bytes (base64 in a column ``image``) and gets back ``label``,
``prob_all`` and the decision ``threshold``. Preprocessing is the exact path the training
images took (:func:`cnmc.data.images.open_rgb`, then the stage's resize and normalisation),
so served and evaluated predictions agree.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from cnmc.data.images import ImageProblem, open_rgb
from cnmc.data.store import normalize_batch
from cnmc.data.transforms import resize_transform

IMAGE_COLUMN = "image"
BATCH_SIZE = 32


@dataclass(frozen=True)
class ModelSpec:
    """Everything besides the weights that prediction needs (stored as ``model.json``)."""

    backbone: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    threshold: float
    temperature: float = 1.0

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelSpec:
        raw = json.loads(Path(path).read_text())
        return cls(**{**raw, "mean": tuple(raw["mean"]), "std": tuple(raw["std"])})


class InvalidInput(ValueError):
    """A request the model can't use; the message names the row and the problem."""


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Encoded image bytes -> resized uint8 (S, S, 3), exactly as the augment stage stores it."""
    image, _ = open_rgb(data)
    chw = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    return resize_transform(image_size)(chw).permute(1, 2, 0).numpy()


def decode_base64_images(values: Sequence[Any], image_size: int) -> np.ndarray:
    """Base64 strings (or raw bytes) -> a (N, S, S, 3) uint8 batch; raises :class:`InvalidInput`."""
    out = np.empty((len(values), image_size, image_size, 3), dtype=np.uint8)
    for row, value in enumerate(values):
        if isinstance(value, str):
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidInput(f"row {row}: '{IMAGE_COLUMN}' is not valid base64") from None
        elif isinstance(value, bytes):
            data = value
        else:
            raise InvalidInput(f"row {row}: '{IMAGE_COLUMN}' must be a base64 string, got {type(value).__name__}")
        try:
            out[row] = decode_image(data, image_size)
        except ImageProblem as exc:
            raise InvalidInput(f"row {row}: {exc}") from None
    return out


class LeukemiaClassifier(mlflow.pyfunc.PythonModel):
    """ALL-vs-Hem classifier over encoded images; weights and spec are MLflow artifacts."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from cnmc.models.backbones import create_backbone

        self.spec = ModelSpec.load(Path(context.artifacts["spec"]))
        self.model = create_backbone(self.spec.backbone, pretrained=False).model
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()

    def predict(self, context, model_input, params=None):  # noqa: ANN001 - MLflow reads hints as a schema
        try:
            values = _image_values(model_input)
            images = decode_base64_images(values, self.spec.image_size)
        except InvalidInput as exc:
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        prob = predict_proba(self.model, images, self.spec)
        return pd.DataFrame({
            "label": np.where(prob >= self.spec.threshold, "all", "hem"),
            "prob_all": prob,
            "threshold": np.full(len(prob), self.spec.threshold),
        })


def _image_values(model_input: Any) -> list[Any]:
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise InvalidInput(f"missing column '{IMAGE_COLUMN}' (base64-encoded image bytes)")
        values = list(model_input[IMAGE_COLUMN])
    elif isinstance(model_input, dict) and IMAGE_COLUMN in model_input:
        values = list(np.atleast_1d(model_input[IMAGE_COLUMN]))
    elif isinstance(model_input, (list, np.ndarray, pd.Series)):
        values = list(np.ravel(model_input))
    else:
        raise InvalidInput(f"expected a column '{IMAGE_COLUMN}' of base64-encoded images")
    if not values:
        raise InvalidInput("no images in the request")
    return values


@torch.no_grad()
def predict_proba(model: torch.nn.Module, images: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Probability of ALL for a uint8 (N, S, S, 3) batch, in chunks, on the model's device."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), BATCH_SIZE):
        batch = normalize_batch(torch.from_numpy(images[start : start + BATCH_SIZE]), spec.mean, spec.std)
        logits = model(batch.to(device)).float() / spec.temperature
        out.append(torch.softmax(logits, dim=1)[:, 1].cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def encode_file(path: Path) -> str:
    """Base64 text of a file's bytes, as a client sends it."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def log_pyfunc(model_dir: Path, example_image: Path, registered_model_name: str | None = None) -> Any:
    """Log ``model_dir`` (``weights.pt`` + ``model.json``) as the run's pyfunc model ``model``."""
    from mlflow.models import infer_signature

    import cnmc

    example = pd.DataFrame({IMAGE_COLUMN: [encode_file(example_image)]})
    output = pd.DataFrame({"label": ["all"], "prob_all": [0.5], "threshold": [0.5]})
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=LeukemiaClassifier(),
        artifacts={"weights": str(model_dir / "weights.pt"), "spec": str(model_dir / "model.json")},
        code_paths=[str(Path(cnmc.__file__).parent)],
        signature=infer_signature(example, output),
        input_example=example,
        pip_requirements=_requirements(),
        registered_model_name=registered_model_name,
    )


def _requirements() -> list[str]:
    from importlib.metadata import requires

    return [r for r in (requires("cnmc") or []) if "extra ==" not in r]
