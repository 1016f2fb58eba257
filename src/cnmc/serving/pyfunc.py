"""The served model: an MLflow pyfunc that holds the weights and the preprocessing.

A client sends encoded image bytes (base64 in a column ``image``) and gets back ``label``,
``prob_all`` and the decision ``threshold``. Preprocessing is the exact path the training
images took (:func:`cnmc.data.images.open_rgb`, then the stage's framing and normalisation),
so served and evaluated predictions agree.

Serving (``cnmc serve``, :mod:`cnmc.serving.http_app`; or ``mlflow models serve -m <uri> --env-manager
local``): the signature has one string column ``image``, so a request is ``{"dataframe_split":
{"columns": ["image"], "data": [[b64]]}}``, ``{"dataframe_records": [{"image": b64}]}`` or
``{"inputs": [b64, ...]}`` (MLflow's server maps a plain JSON list onto the signature's single
column). Every problem with a value (not base64, not
an image, empty, truncated, too large, not a string) raises :class:`InvalidInput`, which
``predict`` turns into ``MlflowException(INVALID_PARAMETER_VALUE)``: HTTP 400 with a message
naming the row and the problem, never a stack trace. Values are only ever bytes: no request can
make the model open a file or unpickle anything.

Probabilities are temperature-scaled (``ModelSpec.temperature``, fitted on validation logits by
:mod:`cnmc.metrics.calibration`). One inference parameter, ``tta`` (bool; default: ``ModelSpec.tta``,
true where validation showed the averaged answer is better), averages them over the 8 flips and
90° rotations (:mod:`cnmc.inference.tta`): ``{"dataframe_split": ..., "params": {"tta": true}}`` over HTTP,
``model.predict(df, params={"tta": True})`` in process. The threshold is the same either way.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel, PythonModelContext

from cnmc.core.config import Framing
from cnmc.data.images import ImageProblem, open_rgb
from cnmc.data.quality import NOT_SEGMENTED, quality_problem, segmented_on_black
from cnmc.data.transforms import frame
from cnmc.inference.familiarity import Familiarity, ensemble_score
from cnmc.inference.probability import predict_cells
from cnmc.inference.schema import REQUEST_COLUMN, cell_answers
from cnmc.inference.spec import ModelSpec
from cnmc.serving.abandoned import stop_if_abandoned

# Encoded bytes per image: a 450x450 BMP is 0.6 MB; 64 MiB holds an uncompressed 22 M-pixel RGB image.
MAX_IMAGE_BYTES = 64 * 1024 * 1024
_DATA_URL = re.compile(r"data:[\w.+/-]*;base64,", re.IGNORECASE)


class InvalidInput(ValueError):
    """A request the model can't use; the message names the row and the problem."""


def decode_cell(data: bytes) -> np.ndarray:
    """Encoded image bytes -> the decoded uint8 (H, W, 3) RGB pixels (:func:`cnmc.data.images.open_rgb`)."""
    image, _ = open_rgb(data)
    return np.array(image, dtype=np.uint8)


def framed(rgb: np.ndarray, framing: Framing | int) -> np.ndarray:
    """Decoded (H, W, 3) pixels -> framed uint8 (S, S, 3), exactly as the augment stage stores them
    (``framing``: the model's :class:`~cnmc.core.config.Framing`, or a side for the whole frame)."""
    framing = framing if isinstance(framing, Framing) else Framing(framing)
    return frame(torch.from_numpy(rgb).permute(2, 0, 1), framing).permute(1, 2, 0).numpy()


def decode_image(data: bytes, framing: Framing | int) -> np.ndarray:
    """Encoded image bytes -> framed uint8 (S, S, 3), as the augment stage stores the image."""
    return framed(decode_cell(data), framing)


def pixel_hash(rgb: np.ndarray) -> str:
    """The first 16 hex digits of the SHA-256 of decoded pixels and their shape: the same for copies
    of one image however they were named or (losslessly) encoded."""
    digest = hashlib.sha256(f"{rgb.shape}".encode())
    digest.update(np.ascontiguousarray(rgb).tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class DecodedRequest:
    """A request's images, framed for each framing asked for, with what the quality gate
    (:func:`cnmc.data.quality.quality_problem`), the segmentation check and the pixels' hash say of each."""

    framed: dict[Framing, np.ndarray]
    problems: list[str]
    segmented: list[bool]
    pixel_hashes: list[str]


def expects_segmented(familiarities: Sequence[Familiarity | None]) -> bool:
    """Whether the models' training cells were all segmented on black (then an image that is not is flagged)."""
    return any(f is not None and f.segmented for f in familiarities)


def gate_reason(problem: str, segmented: bool, expected: bool) -> str:
    """Why an image is not one to judge before any model sees it: the quality gate's ``problem``, or
    an image not ``segmented`` on black where that is ``expected``; "" otherwise."""
    return problem or (NOT_SEGMENTED if expected and not segmented else "")


def gate(rgb: np.ndarray, familiarities: Sequence[Familiarity | None]) -> str:
    """:func:`gate_reason` of decoded pixels."""
    return gate_reason(quality_problem(rgb), segmented_on_black(rgb), expects_segmented(familiarities))


def decode_request(values: Sequence[Any], framings: Iterable[Framing]) -> DecodedRequest:
    """Base64 strings (or raw bytes) -> :class:`DecodedRequest`; raises :class:`InvalidInput`."""
    framings = sorted(set(framings), key=str)
    out = {f: np.empty((len(values), f.image_size, f.image_size, 3), dtype=np.uint8) for f in framings}
    problems, segmented, hashes = [], [], []
    for row, value in enumerate(values):
        stop_if_abandoned(f"after decoding {row} of {len(values)} images")
        data = value_bytes(value, row)
        try:
            rgb = decode_cell(data)
            for framing in framings:
                out[framing][row] = framed(rgb, framing)
        except ImageProblem as exc:
            raise InvalidInput(f"row {row}: {exc}") from None
        except Exception as exc:  # nothing a client sends may end in a stack trace
            reason = f"{exc.__class__.__name__}: {exc}"[:200]
            raise InvalidInput(f"row {row}: could not decode the image ({reason})") from None
        problems.append(quality_problem(rgb))
        segmented.append(segmented_on_black(rgb))
        hashes.append(pixel_hash(rgb))
    return DecodedRequest(out, problems, segmented, hashes)


def decode_base64_images(values: Sequence[Any], framing: Framing | int) -> np.ndarray:
    """Base64 strings (or raw bytes) -> a (N, S, S, 3) uint8 batch; raises :class:`InvalidInput`."""
    framing = framing if isinstance(framing, Framing) else Framing(framing)
    return decode_request(values, [framing]).framed[framing]


def value_bytes(value: Any, row: int = 0) -> bytes:
    """One request value -> the encoded image bytes; :class:`InvalidInput` names the problem.

    A string is base64 (whitespace, as in line-wrapped ``base64`` output, and a
    ``data:image/...;base64,`` prefix are allowed); raw ``bytes`` are taken as they are.
    Nothing else is accepted: a string is never taken as a file path.
    """
    where = f"row {row}: '{REQUEST_COLUMN}'"
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        text = "".join(value.split())
        if match := _DATA_URL.match(text):
            text = text[match.end() :]
        if not text:
            raise InvalidInput(f"{where} is empty (expected base64-encoded image bytes)")
        if len(text) > (MAX_IMAGE_BYTES + 2) // 3 * 4:
            raise InvalidInput(f"{where} is too large (over {MAX_IMAGE_BYTES:,} bytes of image data)")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"{where} is not valid base64") from None
    elif value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        raise InvalidInput(f"{where} is missing (null); expected a base64 string")
    else:
        raise InvalidInput(f"{where} must be a base64 string, got {type(value).__name__}")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidInput(f"{where} is too large ({len(data):,} bytes, limit {MAX_IMAGE_BYTES:,})")
    return data


class _ExplicitSignature(PythonModel):
    """Our models declare their signature when logged (:func:`log_pyfunc`): MLflow's switch that
    skips type-hint inference, and its warning at every class definition and load, is set."""

    _skip_type_hint_validation = True


class LeukemiaClassifier(_ExplicitSignature):
    """ALL-vs-Hem classifier over encoded images; weights and spec are MLflow artifacts."""

    def load_context(self, context: PythonModelContext) -> None:
        self.member = load_member(*_member_files(context.artifacts, ""))

    @property
    def spec(self) -> ModelSpec:
        """What ``GET /info`` shows of the served model."""
        return self.member.spec

    def predict(self, context, model_input, params=None):  # noqa: ANN001 - MLflow reads hints as a schema
        return answer(model_input, params, [self.member], self.member.spec.threshold)


class EnsembleClassifier(_ExplicitSignature):
    """The mean P(ALL) of several trained models (``cnmc ensemble``, a cross-fit's folds): artifacts
    ``weights``/``spec``/``familiarity``, ``weights_1``/``spec_1``/``familiarity_1``, ..., and
    ``ensemble`` (JSON: the threshold on the mean)."""

    def load_context(self, context: PythonModelContext) -> None:
        import json

        artifacts = context.artifacts
        suffixes = [""] + [f"_{i}" for i in range(1, len(artifacts)) if f"spec_{i}" in artifacts]
        self.members = [load_member(*_member_files(artifacts, suffix)) for suffix in suffixes]
        self.threshold = float(json.loads(Path(artifacts["ensemble"]).read_text())["threshold"])

    @property
    def spec(self) -> ModelSpec:
        """What ``GET /info`` shows of the served model: the members' spec (their backbones joined
        by ``+`` where they differ) at the ensemble's threshold."""
        backbones = "+".join(dict.fromkeys(m.spec.backbone for m in self.members))
        return replace(self.members[0].spec, backbone=backbones, threshold=self.threshold)

    def predict(self, context, model_input, params=None):  # noqa: ANN001 - MLflow reads hints as a schema
        return answer(model_input, params, self.members, self.threshold)


@dataclass(frozen=True)
class Member:
    """One trained model of a served model: the network, its spec and, where it was logged with
    one, its picture of its training cells."""

    model: torch.nn.Module
    spec: ModelSpec
    familiarity: Familiarity | None = None


def _member_files(artifacts: dict[str, str], suffix: str) -> tuple[Path, Path, Path | None]:
    familiarity = artifacts.get(f"familiarity{suffix}")
    return (
        Path(artifacts[f"weights{suffix}"]),
        Path(artifacts[f"spec{suffix}"]),
        Path(familiarity) if familiarity else None,
    )


def load_member(weights: Path, spec_file: Path, familiarity: Path | None = None) -> Member:
    """One trained model, in eval mode on the CPU, its spec and its familiarity (where given)."""
    from cnmc.models.backbones import create_backbone

    spec = ModelSpec.load(spec_file)
    model = create_backbone(spec.backbone, pretrained=False).model
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return Member(model.eval(), spec, Familiarity.load(familiarity) if familiarity else None)


def answer(
    model_input: Any, params: dict[str, Any] | None, members: Sequence[Member], threshold: float
) -> pd.DataFrame:
    """The served answer to a request: each image's mean P(ALL) over ``members`` (one model, or an
    ensemble), its label at ``threshold``, the threshold, its familiarity score (the members' mean),
    the quality gate's verdict and its pixels' hash. A bad request raises
    ``MlflowException(INVALID_PARAMETER_VALUE)`` naming the row and the problem (HTTP 400)."""
    try:
        tta = _tta_param(params)
        decoded = decode_request(_image_values(model_input), {m.spec.framing for m in members})
    except InvalidInput as exc:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
    probs, scores = [], []
    for done, member in enumerate(members):
        stop_if_abandoned(f"after {done} of {len(members)} models' forward passes")
        cells = predict_cells(member.model, decoded.framed[member.spec.framing], member.spec, tta=tta)
        probs.append(cells.prob)
        if member.familiarity is not None:
            scores.append(member.familiarity.score(cells.features))
    score = ensemble_score(scores) if len(scores) == len(members) else None
    expected = expects_segmented([m.familiarity for m in members])
    problems = [
        gate_reason(problem, segmented, expected)
        for problem, segmented in zip(decoded.problems, decoded.segmented, strict=True)
    ]
    return cell_answers(np.mean(probs, axis=0), threshold, score, problems, decoded.pixel_hashes)


def _tta_param(params: dict[str, Any] | None) -> bool | None:
    """The ``tta`` inference parameter (MLflow has checked its type against the signature); None:
    each model's own default (``ModelSpec.tta``)."""
    value = (params or {}).get("tta")
    if value is None or isinstance(value, (bool, np.bool_)):
        return None if value is None else bool(value)
    raise InvalidInput(f"parameter 'tta' must be true or false, got {value!r}"[:200])


def _image_values(model_input: Any) -> list[Any]:
    if isinstance(model_input, pd.DataFrame):
        if REQUEST_COLUMN not in model_input.columns:
            raise InvalidInput(f"missing column '{REQUEST_COLUMN}' (base64-encoded image bytes)")
        values = list(model_input[REQUEST_COLUMN])
    elif isinstance(model_input, dict) and REQUEST_COLUMN in model_input:
        values = list(np.atleast_1d(model_input[REQUEST_COLUMN]))
    elif isinstance(model_input, (list, np.ndarray, pd.Series)):
        values = list(np.ravel(model_input))
    else:
        raise InvalidInput(f"expected a column '{REQUEST_COLUMN}' of base64-encoded images")
    if not values:
        raise InvalidInput("no images in the request")
    return values


def encode_file(path: Path) -> str:
    """Base64 text of a file's bytes, as a client sends it."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


@contextmanager
def _quiet_about_cloudpickle() -> Iterator[None]:
    """MLflow warns, at every log, that a python_model object is pickled; ours pickles a reference to
    an installed class of this package (its code travels in ``code_paths``), which is what we ship."""

    def not_that_warning(record: logging.LogRecord) -> bool:
        return "serialized using CloudPickle" not in record.getMessage()

    logger = logging.getLogger("mlflow.pyfunc")
    logger.addFilter(not_that_warning)
    try:
        yield
    finally:
        logger.removeFilter(not_that_warning)


def log_pyfunc(
    weights: Path,
    spec: Path,
    example_image: Path,
    registered_model_name: str | None = None,
    python_model: PythonModel | None = None,
    artifacts: dict[str, str] | None = None,
    tta_default: bool | None = None,
    familiarity: Path | None = None,
) -> Any:
    """Log ``weights`` (``weights.pt``), ``spec`` (``model.json``) and ``familiarity`` (where given)
    as the run's pyfunc model ``model``, with only the code and the requirements that inference
    needs (:mod:`cnmc.serving.model_env`).

    An ensemble (:func:`log_ensemble`) passes its own ``python_model`` and further ``artifacts``."""
    import tempfile

    from mlflow.models import infer_signature

    from cnmc.serving import model_env

    example = pd.DataFrame({REQUEST_COLUMN: [encode_file(example_image)]})
    output = cell_answers(np.array([0.5]), 0.5, np.array([0.5]), [""], ["0" * 16])
    tta = ModelSpec.load(spec).tta if tta_default is None else tta_default
    with tempfile.TemporaryDirectory(prefix="cnmc-code-") as tmp, _quiet_about_cloudpickle():
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=python_model or LeukemiaClassifier(),
            artifacts={"weights": str(weights), "spec": str(spec)}
            | ({"familiarity": str(familiarity)} if familiarity else {})
            | (artifacts or {}),
            code_paths=[str(model_env.copy_code(Path(tmp)))],
            signature=infer_signature(example, output, params={"tta": tta}),
            input_example=example,
            pip_requirements=model_env.requirements(),
            registered_model_name=registered_model_name,
        )


ServedFiles = tuple[Path, Path, Path | None]  # one model's weights, spec and familiarity (None: none fitted)


def log_ensemble(members: Sequence[ServedFiles], threshold: float, example_image: Path, tta_default: bool) -> Any:
    """Log models ``members`` as one :class:`EnsembleClassifier` that answers with their mean P(ALL)
    at ``threshold``: ``cnmc ensemble``'s backbones, or the folds of a cross-fitted backbone (which
    share one spec)."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cnmc-ensemble-") as tmp:
        decision = Path(tmp) / "ensemble.json"
        decision.write_text(json.dumps({"threshold": threshold}) + "\n")
        extra = {
            f"{kind}_{i}": str(path)
            for i, files in enumerate(members[1:], 1)
            for kind, path in zip(("weights", "spec", "familiarity"), files, strict=True)
            if path is not None
        }
        weights, spec, familiarity = members[0]
        return log_pyfunc(
            weights,
            spec,
            example_image,
            python_model=EnsembleClassifier(),
            artifacts=extra | {"ensemble": str(decision)},
            tta_default=tta_default,
            familiarity=familiarity,
        )


def log_served_model(members: Sequence[ServedFiles], threshold: float, example_image: Path) -> Any:
    """Log an evaluated backbone as the run's model: one model, or the ensemble of its cross-fitting
    folds (one spec, its threshold and TTA default)."""
    if len(members) == 1:
        return log_pyfunc(members[0][0], members[0][1], example_image, familiarity=members[0][2])
    return log_ensemble(members, threshold, example_image, ModelSpec.load(members[0][1]).tta)
