"""Model specs, checkpoints and layer selection."""

import pytest
import timm
import torch

from layercrit.errors import LayercritError
from layercrit.measurement.layers import select_layers
from layercrit.models import Normalized, load_state_dict
from layercrit.resolve import resolve_model


def test_timm_spec_builds_a_normalised_model_with_its_pretrained_config():
    resolved = resolve_model("timm:resnet18", pretrained=False)
    assert isinstance(resolved.model, Normalized)
    assert resolved.model.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert (resolved.preprocessing.resize, resolved.preprocessing.crop) == (256, 224)
    assert resolved.num_classes == 1000
    fresh = resolved.fresh()
    assert isinstance(fresh, Normalized) and fresh is not resolved.model


def test_timm_model_with_another_input_size_uses_its_own_config():
    resolved = resolve_model("timm:vit_tiny_patch16_384", pretrained=False)
    assert resolved.preprocessing.crop == 384 and "pretrained_cfg" in resolved.preprocessing.source


def test_torchvision_spec_builds_the_architecture():
    resolved = resolve_model("torchvision:resnet18", pretrained=False)
    assert resolved.model.model.fc.out_features == 1000


@pytest.mark.parametrize("spec, message", [
    ("timm:resnet5O", "unknown timm model 'resnet5O' (did you mean resnet50"),
    ("torchvision:resnet1", "unknown torchvision model 'resnet1'"),
    ("keras:resnet50", "unknown model spec 'keras:resnet50'"),
    ("zoo:nozoo/x", "unknown zoo 'nozoo'"),
])
def test_unknown_models_are_named_with_suggestions(spec, message):
    with pytest.raises(LayercritError) as info:
        resolve_model(spec, pretrained=False)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_pretrained_weights_offline_give_a_one_line_error_naming_where_to_put_them(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at import time by huggingface_hub: patch its constant too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent/hub-cache")
    with pytest.raises(LayercritError) as info:
        resolve_model("timm:resnet10t.c3_in1k", pretrained=True)
    message = str(info.value)
    assert "resnet10t.c3_in1k" in message and "/nonexistent/hub-cache" in message and "\n" not in message


def _checkpoint(tmp_path, state, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


def test_checkpoint_is_unwrapped_stripped_and_sized_from_its_head(tmp_path):
    net = timm.create_model("resnet10t", num_classes=7)
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}
    resolved = resolve_model(_checkpoint(tmp_path, wrapped), arch="timm:resnet10t")
    assert resolved.num_classes == 7
    loaded = resolved.model.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
    assert resolved.fresh().model.fc.out_features == 7


def test_checkpoint_with_wrong_keys_lists_missing_and_unexpected(tmp_path):
    state = timm.create_model("resnet10t", num_classes=7).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer1.0.conv1.weight"]
    with pytest.raises(LayercritError, match=r"missing: layer1\.0\.conv1\.weight; unexpected: extra\.weight"):
        resolve_model(_checkpoint(tmp_path, state), arch="timm:resnet10t")


def test_checkpoint_needs_an_architecture(tmp_path):
    with pytest.raises(LayercritError, match="--arch timm:NAME"):
        resolve_model(_checkpoint(tmp_path, {}))


class Opaque:
    """Stands for the argparse namespaces and other objects that training scripts pickle into checkpoints."""


def test_checkpoint_with_pickled_objects_needs_trust(tmp_path):
    path = _checkpoint(tmp_path, {"state_dict": {"w": torch.zeros(1)}, "args": Opaque()})
    with pytest.raises(LayercritError, match="--trust-checkpoint"):
        load_state_dict(path)


def test_corrupt_checkpoint_is_not_mistaken_for_one_that_needs_trust(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"garbage, not a checkpoint")
    with pytest.raises(LayercritError, match="not a PyTorch or safetensors file, or corrupt") as info:
        load_state_dict(tmp_path / "bad.pth")
    assert "--trust-checkpoint" not in str(info.value)


def test_safetensors_checkpoint_loads(tmp_path):
    from safetensors.torch import save_file

    net = timm.create_model("resnet10t", num_classes=4)
    save_file(net.state_dict(), tmp_path / "w.safetensors")
    resolved = resolve_model(str(tmp_path / "w.safetensors"), arch="timm:resnet10t")
    assert resolved.num_classes == 4


def test_kinds_select_layers_in_network_order():
    model = resolve_model("timm:resnet10t", pretrained=False).model
    names = select_layers(model, "conv,linear")
    assert names[0] == "model.conv1.0" and names[-1] == "model.fc"
    registration = [n for n, _ in model.named_modules()]
    assert names == sorted(names, key=registration.index)
    assert "model.bn1" not in names and "model.bn1" in select_layers(model, "bn")


def test_globs_select_by_name_with_or_without_the_wrapper_prefix():
    model = resolve_model("timm:resnet10t", pretrained=False).model
    assert select_layers(model, "layer4.*.conv*") == select_layers(model, "model.layer4.*.conv*")
    assert all(n.startswith("model.layer4.") for n in select_layers(model, "layer4.*.conv*"))


def test_unknown_layer_pattern_lists_close_matches():
    model = resolve_model("timm:resnet10t", pretrained=False).model
    with pytest.raises(LayercritError, match=r"'layer4\.0\.conv9' matches no module.*close matches: layer4\.0\.conv"):
        select_layers(model, "layer4.0.conv9")


def test_trust_checkpoint_reaches_the_zoo(monkeypatch):
    import layercrit.zoo.paper as paper

    seen = {}

    def fake_resolve(model_id, pretrained=True, *, trust_checkpoint=False):
        seen.update(model_id=model_id, trust=trust_checkpoint)
        return resolve_model("timm:resnet10t", pretrained=False)

    monkeypatch.setattr(paper, "resolve", fake_resolve)
    resolved = resolve_model("zoo:paper/some_model", trust_checkpoint=True)
    assert seen == {"model_id": "some_model", "trust": True} and resolved.spec == "zoo:paper/some_model"
