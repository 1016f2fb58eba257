"""Test-time augmentation: the 8 dihedral views, TTA == plain inference on a D4-invariant image,
the served model's ``tta`` inference parameter (in process, through MLflow's params schema)."""

from __future__ import annotations

import io
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from cnmc.data.store import normalize_batch
from cnmc.inference.forward import predict_outputs, prob_all
from cnmc.inference.probability import predict_proba
from cnmc.inference.schema import CELL_COLUMNS
from cnmc.inference.spec import ModelSpec
from cnmc.inference.tta import VIEW_NAMES, tta_views
from cnmc.serving.pyfunc import LeukemiaClassifier, Member, encode_file, log_pyfunc

BACKBONE = "test_resnet"
SIZE = 32


@pytest.fixture(scope="module")
def net():  # noqa: ANN201 - a cnmc Backbone
    from cnmc.models.backbones import create_backbone

    torch.manual_seed(0)
    backbone = create_backbone(BACKBONE, pretrained=False)
    backbone.model.eval()
    return backbone


def radial_image(size: int = SIZE) -> np.ndarray:
    """uint8 (S, S, 3) depending only on the squared distance to the centre: the same array
    after every flip and 90° rotation."""
    c = (size - 1) / 2
    i, j = np.mgrid[:size, :size]
    r2 = (i - c) ** 2 + (j - c) ** 2
    return np.stack([(255 * np.exp(-r2 / (k * 40.0))).astype(np.uint8) for k in (1, 2, 3)], axis=-1)


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8)


def test_views_are_the_eight_dihedral_transforms_identity_first() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)  # no symmetry at all
    views = tta_views(x)
    assert len(views) == len(VIEW_NAMES) == 8
    assert views[0] is x
    arr = x.numpy()
    reference = [np.rot90(a, k, axes=(-2, -1)) for a in (arr, arr[..., ::-1]) for k in range(4)]
    got = [v.numpy() for v in views]
    assert all(v.shape == arr.shape for v in got)
    # Each view is one D4 element, and every element appears exactly once.
    matches = [[np.array_equal(v, r) for r in reference] for v in got]
    assert all(sum(row) == 1 for row in matches)
    assert sorted(row.index(True) for row in matches) == list(range(8))
    named = dict(zip(VIEW_NAMES, got, strict=True))
    np.testing.assert_array_equal(named["hflip"], arr[..., ::-1])
    np.testing.assert_array_equal(named["vflip"], arr[..., ::-1, :])
    np.testing.assert_array_equal(named["transpose"], arr.swapaxes(-2, -1))
    with pytest.raises(ValueError, match="square"):
        tta_views(torch.zeros(1, 3, 4, 5))


def test_tta_equals_plain_inference_on_a_d4_invariant_image(net) -> None:  # noqa: ANN001
    image = radial_image()
    for view in tta_views(torch.from_numpy(image).permute(2, 0, 1)[None]):
        assert torch.equal(view, torch.from_numpy(image).permute(2, 0, 1)[None])
    spec = ModelSpec(BACKBONE, SIZE, net.mean, net.std, threshold=0.5, temperature=1.7)
    images = np.stack([image, np.full_like(image, 120)])  # radial and constant
    plain = predict_proba(net.model, images, spec)
    with_tta = predict_proba(net.model, images, spec, tta=True)
    np.testing.assert_allclose(with_tta, plain, rtol=0, atol=1e-5)


def test_tta_prob_averages_the_temperature_scaled_softmax_over_the_views(net) -> None:  # noqa: ANN001
    images = random_images(3)
    spec = ModelSpec(BACKBONE, SIZE, net.mean, net.std, threshold=0.5, temperature=2.0)
    batch = normalize_batch(torch.from_numpy(images), net.mean, net.std)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(net.model(v) / 2.0, dim=1) for v in tta_views(batch)]).mean(0)
        plain = torch.softmax(net.model(batch) / 2.0, dim=1)
    logits = predict_outputs(net.model, [torch.from_numpy(images)], net.mean, net.std, views=tta_views).logits
    assert logits.shape == (3, len(VIEW_NAMES), 2)
    out = predict_proba(net.model, images, spec, tta=True)
    np.testing.assert_allclose(out, expected[:, 1].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(prob_all(logits, 2.0), out, rtol=0, atol=1e-12)
    assert not np.allclose(out, plain[:, 1].numpy(), atol=1e-4)


def png_b64(image: np.ndarray) -> str:
    import base64

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_pyfunc_takes_the_tta_parameter(net, tmp_path: Path, mlflow_db: str) -> None:  # noqa: ANN001
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    torch.save(net.model.state_dict(), model_dir / "weights.pt")
    spec = ModelSpec(BACKBONE, SIZE, tuple(net.mean), tuple(net.std), threshold=0.5, temperature=1.5)
    spec.save(model_dir / "model.json")
    example = tmp_path / "example.png"
    Image.fromarray(radial_image()).save(example)
    # Name the experiment: an earlier test's active experiment id means nothing in this fresh store.
    experiment = mlflow.set_experiment("cnmc-tta-test")
    with mlflow.start_run(experiment_id=experiment.experiment_id):
        info = log_pyfunc(model_dir / "weights.pt", model_dir / "model.json", example)
    params_schema = info.signature.params
    assert params_schema is not None and [(p.name, p.default) for p in params_schema.params] == [("tta", False)]

    model = mlflow.pyfunc.load_model(info.model_uri)
    images = random_images(3)
    request = pd.DataFrame({"image": [encode_file(example)] + [png_b64(image) for image in images]})
    plain = model.predict(request)
    default = model.predict(request, params={"tta": False})
    tta = model.predict(request, params={"tta": True})
    assert list(tta.columns) == list(plain.columns) == CELL_COLUMNS
    pd.testing.assert_frame_equal(default, plain)
    # Same as predict_proba in process, with the stored temperature; the radial image is unchanged.
    np.testing.assert_allclose(tta["prob_all"][1:], predict_proba(net.model, images, spec, tta=True), atol=1e-6)
    np.testing.assert_allclose(plain["prob_all"][1:], predict_proba(net.model, images, spec), atol=1e-6)
    assert tta["prob_all"][0] == pytest.approx(plain["prob_all"][0], abs=1e-5)
    assert not np.allclose(tta["prob_all"][1:], plain["prob_all"][1:], atol=1e-4)
    assert (tta["threshold"] == 0.5).all()
    with pytest.raises(MlflowException, match="tta"):
        model.predict(request, params={"tta": "maybe"})


def test_classifier_in_process_reads_params(net) -> None:  # noqa: ANN001
    classifier = LeukemiaClassifier()
    classifier.member = Member(net.model, ModelSpec(BACKBONE, SIZE, net.mean, net.std, threshold=0.5))
    request = pd.DataFrame({"image": [png_b64(image) for image in random_images(2, seed=1)]})
    none, off = classifier.predict(None, request), classifier.predict(None, request, params={"tta": False})
    on = classifier.predict(None, request, params={"tta": True})
    pd.testing.assert_frame_equal(none, off)
    assert not np.allclose(on["prob_all"], off["prob_all"], atol=1e-4)
    with pytest.raises(MlflowException, match="'tta' must be true or false") as info:
        classifier.predict(None, request, params={"tta": "yes"})
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
