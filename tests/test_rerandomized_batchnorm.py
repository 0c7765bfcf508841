"""What `rerandomize` makes of a BatchNorm layer (docs/beyond.md): weight 1, except the last BatchNorm of each
residual block of timm's ResNets, which timm initialises to 0 and whose reset deletes the block's residual branch."""

import pytest
import torch

import layercrit
from layercrit.measurement.resets import get_reset, load_in_place


def rerandomized(spec: str, layer: str):
    resolved = layercrit.resolve_model(spec, pretrained=False)
    reset = get_reset("rerandomize", fresh=resolved.fresh).bind(resolved.model)
    module = resolved.model.get_submodule(layer)
    return resolved, module, reset.new_state(layer, module, 0)


@pytest.mark.parametrize(("spec", "layer", "weight"), [
    ("timm:resnet50", "model.layer1.1.bn2", 1.0),
    ("timm:resnet50", "model.layer1.1.bn3", 0.0),  # timm's zero_init_last
    ("timm:resnet18", "model.layer2.1.bn2", 0.0),
    ("torchvision:resnet50", "model.layer1.1.bn3", 1.0),
    ("layercrit:fmnist_resnet20", "model.layer1.1.bn2", 1.0),
])
def test_a_rerandomized_batchnorm_takes_the_fresh_instances_weight(spec, layer, weight):
    _, _, state = rerandomized(spec, layer)
    assert torch.all(state["weight"] == weight) and torch.all(state["bias"] == 0)
    assert torch.all(state["running_mean"] == 0) and torch.all(state["running_var"] == 1)


def test_rerandomizing_a_timm_blocks_last_batchnorm_leaves_only_its_shortcut():
    resolved, module, state = rerandomized("timm:resnet50", "model.layer1.1.bn3")
    load_in_place(module, state)
    seen = {}
    block = resolved.model.get_submodule("model.layer1.1")
    block.register_forward_hook(lambda _, args, output: seen.update(input=args[0], output=output))
    with torch.no_grad():
        resolved.model.eval()(torch.rand(1, 3, 64, 64))
    assert torch.equal(seen["output"], seen["input"])  # relu(shortcut + 0) of a non-negative input
