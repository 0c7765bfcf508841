"""The one forward-trace helper every probe reads: calls in order, nesting, repeated calls, and tensor uses."""

import torch
from torch import nn

from layercrit.measurement.trace import trace


class Twice(nn.Module):
    """conv -> bn, then the same relu twice, and the conv's output used again outside the BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        z = self.relu(self.bn(y))
        return self.relu(z) + y


def test_calls_are_in_start_order_with_one_clock_and_nested_ends():
    model = Twice().eval()
    watched = trace(model, torch.rand(1, 1, 4, 4))
    assert [c.name for c in watched.calls] == ["conv", "bn", "relu", "relu"]
    assert watched.counts() == {"conv": 1, "bn": 1, "relu": 2}
    conv, bn, first, second = watched.calls
    assert conv.start < conv.end < bn.start < bn.end < first.start < first.end < second.start < second.end
    assert bn.args[0] is conv.output and first.args[0] is bn.output
    assert second.outputs == (second.output,) and second.versions == (second.output._version,)


def test_uses_name_the_modules_running_when_a_tensor_was_taken():
    model = Twice().eval()
    watched = trace(model, torch.rand(1, 1, 4, 4), watch_uses=True)
    conv_output = watched.calls[0].output
    stacks = [running for tensor, running in watched.uses if tensor is conv_output]
    assert ("bn",) in stacks  # batch_norm inside the BatchNorm's forward
    assert () in stacks  # the addition in the model's own forward, outside every submodule
    assert trace(model, torch.rand(1, 1, 4, 4)).uses == []
