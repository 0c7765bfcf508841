"""Language models measured like image models: next-token distributions, transformer groups, reset skip."""

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import layercrit
from layercrit.columns import METRIC_COLUMNS
from layercrit.errors import LayercritError
from tests.conftest import TINY_LM_TEXT, gpt2_forward_without, run_cli

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    """The tiny GPT-2, briefly trained on its text so that its predictions are far from uniform."""
    from layercrit.data.text import token_stream, token_windows
    from layercrit.training_lm import fit_causal_lm

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_lm_dir)
    windows = token_windows(token_stream([TINY_LM_TEXT], tokenizer), 16)
    torch.manual_seed(0)
    fit_causal_lm(model, windows, steps=30, batch_size=8, lr=1e-2, warmup=3, precision="fp32")
    return model.eval(), windows[:12]


def measure(model, windows, **options):
    defaults = {"trials": 1, "batch_size": 4, "progress": False, "task": "causal-lm"}
    return layercrit.measure(model, windows, **{**defaults, **options})


@pytest.mark.parametrize("engine", ["fast", "naive"])
def test_skip_of_a_block_gives_the_numbers_of_a_forward_without_that_block(lm, engine):
    model, windows = lm
    df = measure(model, windows, groups="blocks", reset="skip", engine=engine)
    row = df[df.layer == "transformer.h.2"].iloc[0]
    with torch.no_grad():
        clean = model(windows).logits[:, :-1].flatten(0, 1).double()
        dropped = gpt2_forward_without(model, {2}, windows)[:, :-1].flatten(0, 1).double()
    truth = windows[:, 1:].flatten()
    cos = F.cosine_similarity(F.softmax(dropped, 1), F.softmax(clean, 1), dim=1).mean().item()
    kl = F.kl_div(F.log_softmax(dropped, 1), F.log_softmax(clean, 1), log_target=True, reduction="none").sum(1)
    assert row.n_images == truth.numel()
    assert row.criticality == pytest.approx(1 - cos, abs=1e-6)
    assert row.pred_kl == pytest.approx(kl.mean().item(), abs=1e-6)
    assert row.loss == pytest.approx(F.cross_entropy(dropped, truth).item(), abs=1e-5)
    assert row.agreement == pytest.approx((dropped.argmax(1) == clean.argmax(1)).double().mean().item())
    assert row.criticality > 1e-3  # the trained model does depend on the block


def test_the_original_row_holds_the_models_next_token_loss(lm):
    model, windows = lm
    df = measure(model, windows, groups="blocks", reset="skip")
    with torch.no_grad():
        logits = model(windows).logits[:, :-1].flatten(0, 1)
    expected = F.cross_entropy(logits.double(), windows[:, 1:].flatten()).item()
    assert df[df.layer == "original"].loss.iloc[0] == pytest.approx(expected, abs=1e-6)


def test_rerandomized_blocks_give_identical_rows_from_both_engines(lm, tiny_lm_dir):
    model, windows = lm
    fresh = lambda: transformers.AutoModelForCausalLM.from_config(model.config).eval()  # noqa: E731
    options = {"groups": "blocks", "reset": "rerandomize", "trials": 2, "fresh_model": fresh}
    fast = measure(model, windows, engine="fast", channels_last=False, fold_bn=False, **options)
    naive = measure(model, windows, engine="naive", **options)
    pd.testing.assert_frame_equal(fast[list(METRIC_COLUMNS)], naive[list(METRIC_COLUMNS)], check_exact=True)
    assert list(fast.layer.unique()) == ["original", *[f"transformer.h.{i}" for i in range(4)]]


def test_windows_of_blocks_skip_them_together(lm):
    model, windows = lm
    df = measure(model, windows, groups="window:2", reset="skip")
    assert list(df.layer) == ["original", "transformer.h.0+2", "transformer.h.1+2", "transformer.h.2+2"]
    with torch.no_grad():
        dropped = gpt2_forward_without(model, {1, 2}, windows)[:, :-1].flatten(0, 1)
    loss = F.cross_entropy(dropped.double(), windows[:, 1:].flatten()).item()
    assert df[df.layer == "transformer.h.1+2"].loss.iloc[0] == pytest.approx(loss, abs=1e-5)


def test_attention_and_mlp_groups_find_the_sub_blocks(lm):
    model, windows = lm
    attention = measure(model, windows, groups="attention", reset="skip")
    mlp = measure(model, windows, groups="mlp", reset="zero")
    assert list(attention.layer[1:]) == [f"transformer.h.{i}.attn" for i in range(4)]
    assert list(mlp.layer[1:]) == [f"transformer.h.{i}.mlp" for i in range(4)]
    assert (attention.criticality[1:] > 0).all() and (mlp.criticality[1:] > 0).all()


def test_skip_refuses_a_single_layer_naming_the_groups(lm):
    model, windows = lm
    with pytest.raises(LayercritError, match="groups='blocks', 'attention', 'mlp' or 'window:N'"):
        measure(model, windows, layers="transformer.h.0.mlp.c_fc", reset="skip")


def test_gpt2_conv1d_layers_count_as_linear(lm):
    from layercrit.measurement.layers import select_layers

    model, _ = lm
    assert "transformer.h.0.attn.c_attn" in select_layers(model, "linear")
    assert "transformer.wte" in select_layers(model, "embedding")
    assert "transformer.h.0.ln_1" in select_layers(model, "ln")


def test_run_measures_an_hf_model_on_a_text_file(capsys, tiny_lm_dir, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(TINY_LM_TEXT)
    code, out, err = run_cli(capsys, "run", "--model", f"hf:{tiny_lm_dir}", "--data", text, "--seq-len", 16,
                             "--windows", 6, "--groups", "blocks", "--reset", "skip", "--trials", 1,
                             "--out", tmp_path / "run", "--quiet")
    assert code == 0, err
    rows = pd.read_csv(tmp_path / "run" / "results.csv")
    assert list(rows.layer) == ["original", *[f"transformer.h.{i}" for i in range(4)]]
    assert (rows.n_images == 6 * 15).all()


def test_block_influence_and_angular_distance_are_computed_from_each_blocks_input_and_output(lm):
    model, windows = lm
    df = measure(model, windows, groups="window:2", reset="skip")
    inputs, outputs = {}, {}
    hooks = [model.transformer.h[1].register_forward_pre_hook(lambda m, a, k: inputs.__setitem__(1, a[0]),
                                                              with_kwargs=True),
             model.transformer.h[2].register_forward_hook(
                 lambda m, a, o: outputs.__setitem__(2, o[0] if isinstance(o, tuple) else o))]
    with torch.no_grad():
        model(windows)
    for hook in hooks:
        hook.remove()
    cos = F.cosine_similarity(inputs[1].double(), outputs[2].double(), dim=-1).flatten()
    row = df[df.layer == "transformer.h.1+2"].iloc[0]
    assert row.block_influence == pytest.approx(1 - cos.mean().item(), abs=1e-9)
    assert row.angular_distance == pytest.approx((torch.arccos(cos) / torch.pi).mean().item(), abs=1e-9)
    assert df[df.layer == "original"].block_influence.isna().all()


def test_layer_table_carries_the_proxies_and_their_rank_agreement_has_no_interval_with_four_blocks(lm):
    from layercrit.measurement.estimate import layer_table
    from layercrit.measurement.proxies import proxy_agreement

    model, windows = lm
    layers = layer_table(measure(model, windows, groups="blocks", reset="skip"))
    assert {"block_influence", "angular_distance"} <= set(layers.columns) and layers.block_influence.notna().all()
    agreement = proxy_agreement(layers)
    assert set(agreement.proxy) == {"block_influence", "angular_distance"} and (agreement.n == 4).all()
    assert agreement.rho.between(-1, 1).all()
    assert agreement.rho_low.isna().all() and agreement.rho_high.isna().all()  # fewer than MIN_BLOCKS_FOR_INTERVAL


def test_image_rows_have_no_proxies(tiny_model, tiny_data):
    df = layercrit.measure(tiny_model, tiny_data, trials=1, progress=False)
    assert df.block_influence.isna().all()
    from layercrit.measurement.estimate import layer_table
    assert "block_influence" not in layer_table(df).columns


def test_rerandomize_of_an_hf_model_initialises_each_target_alone(tiny_lm_dir, monkeypatch):
    from layercrit.resolve import resolve_model

    resolved = resolve_model(f"hf:{tiny_lm_dir}")
    assert resolved.fresh is None
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config",
                        lambda *a, **k: pytest.fail("built a whole model for a reset"))
    windows = torch.randint(0, resolved.num_classes, (6, 16), generator=torch.Generator().manual_seed(0))
    first = measure(resolved, windows, groups="blocks", reset="rerandomize", trials=2)
    again = measure(resolved, windows, groups="blocks", reset="rerandomize", trials=2)
    pd.testing.assert_frame_equal(first[list(METRIC_COLUMNS)], again[list(METRIC_COLUMNS)])
    rows = first[first.layer == "transformer.h.1"]
    assert rows.computed_in_trial.tolist() == [0, 1] and rows.criticality.iloc[0] != rows.criticality.iloc[1]
