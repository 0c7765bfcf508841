"""The fast engine (prefix replay) gives exactly the naive engine's numbers, on every architecture family."""

import pytest
import timm
import torch
from torch import nn

import layercrit
from layercrit.columns import METRIC_COLUMNS
from layercrit.measurement.engine import _CallStructure, _out_of_place
from layercrit.models import Preprocessing, wrap_module

PRE = Preprocessing(resize=None, crop=None, source="test")


def timm_model(name, **kwargs):
    torch.manual_seed(0)
    build = lambda: timm.create_model(name, num_classes=10, **kwargs)  # noqa: E731
    return wrap_module(build().eval(), fresh=build, preprocessing=PRE, spec=f"timm:{name}")


def images(size, n=6, chans=3):
    generator = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (n, chans, size, size), dtype=torch.uint8, generator=generator),
            torch.randint(0, 10, (n,), generator=generator))


def assert_engines_agree(resolved, data, layers="conv,linear", trials=2, batch_size=4):
    """Same memory layout in both (NCHW): prefix replay itself must not change a single bit."""
    fast = layercrit.measure(resolved, data, layers=layers, trials=trials, batch_size=batch_size, channels_last=False, fold_bn=False)
    naive = layercrit.measure(resolved, data, layers=layers, trials=trials, batch_size=batch_size,
                              engine="naive")
    assert list(fast.layer) == list(naive.layer)
    numeric = [c for c in METRIC_COLUMNS]
    difference = (fast[numeric] - naive[numeric]).abs().max().max()
    assert difference <= 1e-5, difference
    assert fast.criticality.iloc[1:].max() > 0  # the resets did something
    return fast


# Every layer of a whole model; test_architectures checks chosen layers of every family in the fast tier.
@pytest.mark.parametrize("name, kwargs, size", [
    ("resnet18", {"zero_init_last": False}, 32),
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [
        ("mobilenetv3_small_050", {}, 32),  # depthwise convs, squeeze-excite, hard-swish
        ("densenet121", {}, 32),  # concatenations of every earlier output
        ("convnext_atto", {}, 32),
        ("vit_tiny_patch16_224", {"img_size": 32}, 32),  # attention qkv/proj, MLP, patch embedding
    ]),
])
def test_fast_engine_equals_naive_engine(name, kwargs, size):
    resolved = timm_model(name, **kwargs)
    layers = "conv,linear" if name != "densenet121" else "features.denseblock1.*,features.transition1.conv,classifier"
    assert_engines_agree(resolved, images(size), layers=layers)


def test_fast_engine_equals_naive_engine_for_torchvision_vit_with_multihead_attention():
    import torchvision

    build = lambda: torchvision.models.VisionTransformer(  # noqa: E731
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)
    torch.manual_seed(0)
    trained = build().eval()
    nn.init.normal_(trained.heads.head.weight, std=0.5)  # torchvision zero-inits the head: give it a signal
    resolved = wrap_module(trained, fresh=build, preprocessing=PRE)
    # out_proj is never called as a module (MultiheadAttention uses its weight directly): it must still reset.
    df = assert_engines_agree(resolved, images(32), layers="conv,linear")
    assert df[df.layer.str.endswith("out_proj")].criticality.max() > 0


class SharedAndTied(nn.Module):
    """A block called twice, and a decoder tied to the encoder's weight: replay must not cut corners here."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.encode = nn.Linear(8, 8)
        self.decode = nn.Linear(8, 8)
        self.decode.weight = self.encode.weight
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.shared(torch.relu(self.shared(x))))
        x = x.mean(dim=(2, 3))
        return self.head(torch.tanh(self.decode(torch.relu(self.encode(x)))))


def test_modules_called_twice_and_tied_weights_take_full_forwards_and_still_agree():
    torch.manual_seed(0)
    resolved = wrap_module(SharedAndTied().eval(), fresh=SharedAndTied, preprocessing=PRE)
    assert_engines_agree(resolved, images(8))
    structure = _CallStructure.probe(resolved.model, torch.rand(2, 3, 8, 8))
    assert structure.calls["model.shared"] == 2
    assert "model.shared" not in structure.replayable_before(["model.head"])
    assert structure.replayable_before(["model.decode"]) == []


def test_replay_skips_everything_before_the_reset_layer():
    resolved = timm_model("resnet18", zero_init_last=False)
    structure = _CallStructure.probe(resolved.model, torch.rand(2, 3, 32, 32))
    replayed = structure.replayable_before(["model.layer3.1.conv1"])
    assert {"model.conv1", "model.layer1", "model.layer2", "model.layer3.0"} <= set(replayed)
    assert "model.layer3.1.conv1" not in replayed and "model.layer4" not in replayed
    assert "model.act1" not in replayed  # in-place ReLU: its output aliases its input


def test_in_place_activations_run_out_of_place_during_replay_so_they_replay_too_and_are_restored():
    resolved = timm_model("resnet18", zero_init_last=False)
    with _out_of_place(resolved.model):
        structure = _CallStructure.probe(resolved.model, torch.rand(2, 3, 32, 32))
        assert "model.act1" in structure.replayable_before(["model.layer3.1.conv1"])
    assert resolved.model.model.act1.inplace is True
    assert "model.layer1.0.bn2" in structure.mutated  # `x += shortcut` changes it in place: replayed from copies
    assert "model.layer1" not in structure.mutated  # a block's output is only read: replayed as recorded
    assert_engines_agree(resolved, images(32), layers="layer1.1.conv2,layer2.0.*,fc")


class ChangesEarlyOutput(nn.Module):
    """Parent code changes a module's output in place, always (`always`) or only once `late` is reset to zero."""

    def __init__(self, always: bool):
        super().__init__()
        self.always = always
        self.early = nn.Conv2d(3, 4, 3)
        self.late = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 10)
        with torch.no_grad():
            self.late.weight.copy_(-self.late.weight.abs() - 0.01)  # trained: negative sum; zeroed: sum 0

    def forward(self, x):
        y = self.early(x)
        z = self.late(y)
        if self.always or self.late.weight.sum() >= 0:
            y.mul_(3)
        return self.head((z + y).mean((2, 3)))


@pytest.mark.parametrize("always", [True, False])
def test_recorded_outputs_changed_in_place_are_replayed_from_copies_never_reused(always, caplog):
    torch.manual_seed(0)
    resolved = wrap_module(ChangesEarlyOutput(always).eval(), fresh=lambda: ChangesEarlyOutput(always),
                           preprocessing=PRE)
    structure = _CallStructure.probe(resolved.model, torch.rand(2, 3, 8, 8))
    assert ("model.early" in structure.mutated) is always  # seen in the probe, or only under the reset
    data = images(8, n=12)
    with caplog.at_level("INFO", logger="layercrit.measurement.engine"):
        fast = layercrit.measure(resolved, data, layers="late", reset="zero", trials=1, batch_size=4,
                                 channels_last=False, fold_bn=False)
    naive = layercrit.measure(resolved, data, layers="late", reset="zero", trials=1, batch_size=4,
                              engine="naive")
    assert fast[list(METRIC_COLUMNS)].equals(naive[list(METRIC_COLUMNS)])
    assert fast.criticality.iloc[1] > 0
    assert ("changed in place downstream" in caplog.text) is (not always)  # caught at run time, chunk redone


def test_small_cache_budget_splits_layers_into_chunks_with_identical_results():
    resolved = timm_model("resnet18", zero_init_last=False)
    data = images(32)
    roomy = layercrit.measure(resolved, data, trials=1, batch_size=3)
    chunks = []
    tight = layercrit.measure(resolved, data, trials=1, batch_size=3, max_cache_mb=0.05,
                              on_rows=lambda rows: chunks.append(len(rows)))
    assert len(chunks) > 3
    assert roomy.equals(tight)


@pytest.mark.slow
def test_resets_take_effect_under_torch_compile(tiny_model, tiny_data):
    compiled = layercrit.measure(tiny_model, tiny_data, layers="fc", reset="zero", trials=1, compile=True)
    eager = layercrit.measure(tiny_model, tiny_data, layers="fc", reset="zero", trials=1)
    row = compiled[compiled.layer == "model.fc"].iloc[0]
    assert row.criticality > 0.01
    assert row.criticality == pytest.approx(eager[eager.layer == "model.fc"].criticality.item(), abs=1e-5)


def test_default_nhwc_layout_and_folded_batchnorm_change_fp32_results_only_in_the_last_bits():
    resolved = timm_model("resnet18", zero_init_last=False)
    data = images(32, n=16)
    default = layercrit.measure(resolved, data, trials=1, batch_size=8)
    naive = layercrit.measure(resolved, data, trials=1, batch_size=8, engine="naive")
    assert (default.top1_acc == naive.top1_acc).all() and (default.agreement == naive.agreement).all()
    assert (default.pred_cos_sim - naive.pred_cos_sim).abs().max() < 1e-6
    assert (default.loss - naive.loss).abs().max() < 1e-4


def test_bf16_stays_close_to_fp32(tiny_model, tiny_data):
    fp32 = layercrit.measure(tiny_model, tiny_data, trials=1)
    bf16 = layercrit.measure(tiny_model, tiny_data, trials=1, precision="bf16")
    assert (fp32.pred_cos_sim - bf16.pred_cos_sim).abs().max() < 0.01
    assert set(bf16.precision) == {"bf16"}


def test_a_group_of_modules_reset_together_agrees_across_engines():
    from layercrit.data import EvalSet
    from layercrit.measurement import engine
    from layercrit.measurement.layers import Target
    from layercrit.measurement.resets import Rerandomize

    resolved = timm_model("resnet18", zero_init_last=False)
    evalset = EvalSet.from_tensors(*images(32))
    block = Target("layer2.1", ["model.layer2.1.conv1", "model.layer2.1.conv2"])
    rows = {}
    for name in ("fast", "naive"):
        reset = Rerandomize(seed=0, fresh=resolved.fresh)
        options = engine.EngineOptions(engine=name, batch_size=4, progress=False, channels_last=False, fold_bn=False)
        rows[name] = engine.run(resolved.model, evalset, [block, "model.fc"], reset, [0, 1], options)
    assert [r["layer"] for r in rows["fast"]] == ["original", "layer2.1", "layer2.1", "model.fc", "model.fc"]
    for fast, naive in zip(rows["fast"], rows["naive"], strict=True):
        assert fast["pred_cos_sim"] == pytest.approx(naive["pred_cos_sim"], abs=1e-6)
    assert rows["fast"][1]["criticality"] > 0


def test_image_target_ci_stops_units_early_on_the_same_image_order_and_reports_their_width():
    resolved = timm_model("resnet18", zero_init_last=False)
    data = images(16, n=120)
    full = layercrit.measure(resolved, data, layers="layer4.1.conv2,fc", trials=1, batch_size=10)
    adaptive = layercrit.measure(resolved, data, layers="layer4.1.conv2,fc", trials=1, batch_size=10,
                                 image_target_ci=0.45)
    rows = adaptive[adaptive.layer != "original"]
    assert (rows.n_images < 120).all() and (rows.n_images % 10 == 0).all()
    assert (rows.criticality_ci <= 0.45).all() and (rows.top1_ci <= 45).all()
    assert adaptive[adaptive.layer == "original"].n_images.item() == 120
    assert full.criticality_ci.isna().all()
    # Stopping after n images gives the numbers a full run over those same first n images gives.
    n = int(rows.n_images.iloc[0])
    prefix = layercrit.measure(resolved, (data[0][:n], data[1][:n]), layers="layer4.1.conv2", trials=1,
                               batch_size=10)
    assert prefix.criticality.iloc[1] == pytest.approx(rows.criticality.iloc[0], abs=1e-9)


class OutOfMemoryAbove(nn.Module):
    """Stands for a GPU: batches larger than ``limit`` run out of memory."""

    def __init__(self, model, limit):
        super().__init__()
        self.model, self.limit = model, limit

    def forward(self, x):
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.model(x)


@pytest.mark.parametrize("engine_name", ["fast", "naive"])
def test_out_of_memory_halves_the_batch_and_gives_the_same_rows(tiny_model, tiny_data, engine_name, caplog):
    from layercrit.models import ResolvedModel

    wrapped = ResolvedModel(model=OutOfMemoryAbove(tiny_model.model, limit=12),
                            fresh=lambda: OutOfMemoryAbove(tiny_model.fresh(), limit=12),
                            preprocessing=tiny_model.preprocessing, spec="test:oom", num_classes=10)
    tuned = layercrit.measure(wrapped, tiny_data, trials=2, batch_size=48, engine=engine_name)
    small = layercrit.measure(wrapped, tiny_data, trials=2, batch_size=12, engine=engine_name)
    numeric = list(METRIC_COLUMNS)
    assert (tuned[numeric] - small[numeric]).abs().max().max() < 1e-9
    assert "batch size down to 12" in caplog.text


def test_the_callers_model_is_left_in_its_layout_so_a_later_naive_run_is_still_the_papers_nchw():
    resolved = timm_model("resnet18", zero_init_last=False)
    data = images(32)
    naive_first = layercrit.measure(resolved, data, layers="layer2.0.conv1,fc", trials=1, engine="naive")
    layercrit.measure(resolved, data, layers="layer2.0.conv1,fc", trials=1)  # NHWC inside
    assert all(p.is_contiguous() for p in resolved.model.parameters())
    naive_again = layercrit.measure(resolved, data, layers="layer2.0.conv1,fc", trials=1, engine="naive")
    assert naive_again[list(METRIC_COLUMNS)].equals(naive_first[list(METRIC_COLUMNS)])
