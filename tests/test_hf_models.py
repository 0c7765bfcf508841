"""hf: models (transformers Auto classes), the block finder and depth pruning (layercrit prune)."""

import sys

import pytest
import torch

from tests.conftest import assert_one_line_error, gpt2_forward_without, run_cli

transformers = pytest.importorskip("transformers")

from layercrit.errors import LayercritError  # noqa: E402
from layercrit.models.blocks import drop_blocks, find_blocks, parse_blocks  # noqa: E402
from layercrit.resolve import resolve_model  # noqa: E402


def test_hf_folder_resolves_to_the_saved_causal_lm_with_its_tokenizer(tiny_lm_dir):
    resolved = resolve_model(f"hf:{tiny_lm_dir}")
    saved = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    ids = torch.tensor([resolved.tokenizer("def f(x):\n    return x")["input_ids"]])
    assert resolved.metadata["kind"] == "causal-lm"
    assert resolved.num_classes == saved.config.vocab_size
    assert torch.equal(resolved.model(ids).logits, saved(ids).logits)


def test_hf_dtype_sets_the_weights_dtype(tiny_lm_dir):
    resolved = resolve_model(f"hf:{tiny_lm_dir}", dtype="bfloat16")
    assert {p.dtype for p in resolved.model.parameters()} == {torch.bfloat16}


def test_hf_without_pretrained_weights_is_the_architecture_with_new_weights(tiny_lm_dir):
    trained = resolve_model(f"hf:{tiny_lm_dir}").model
    fresh = resolve_model(f"hf:{tiny_lm_dir}", pretrained=False, seed=1).model
    assert type(fresh) is type(trained)
    assert not torch.equal(fresh.transformer.h[0].attn.c_attn.weight, trained.transformer.h[0].attn.c_attn.weight)


def test_an_uncached_hub_model_offline_is_one_line_naming_what_to_download(capsys, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    code, _, err = run_cli(capsys, "prune", "--model", "hf:nobody/no-such-lm", "--drop", "1", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "HF_HUB_OFFLINE", "hf download nobody/no-such-lm", str(tmp_path))


def test_hf_models_without_transformers_name_the_extra_to_install(monkeypatch, tiny_lm_dir):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(LayercritError, match=r"pip install 'layercrit\[lm\]'"):
        resolve_model(f"hf:{tiny_lm_dir}")


def test_hf_image_classifier_takes_images_in_0_1_and_normalises_them(tmp_path):
    config = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=5)
    config.architectures = ["ViTForImageClassification"]
    torch.manual_seed(0)
    vit = transformers.ViTForImageClassification(config).eval()
    vit.save_pretrained(tmp_path)
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5, 0.4, 0.3],
                                   image_std=[0.2, 0.25, 0.3]).save_pretrained(tmp_path)
    resolved = resolve_model(f"hf:{tmp_path}")
    x = torch.rand(2, 3, 16, 16)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert resolved.metadata["kind"] == "image-classification" and resolved.num_classes == 5
    assert (resolved.preprocessing.crop, resolved.preprocessing.mean) == (16, (0.5, 0.4, 0.3))
    assert torch.allclose(resolved.model(x).logits, vit(pixel_values=(x - mean) / std).logits, atol=1e-6)


@pytest.mark.parametrize("build, block", [
    (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50)),
     "GPT2Block"),
    (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2, vocab_size=50)),
     "LlamaDecoderLayer"),
    (lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
        num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2, vocab_size=50)),
     "BertLayer"),
    (lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2, image_size=16,
        patch_size=8)), "ViTLayer"),
])
def test_find_blocks_finds_the_block_stack_of_common_architectures(build, block):
    model = build()
    blocks = find_blocks(model)
    assert blocks.names == tuple(f"{blocks.container}.{i}" for i in range(3))
    assert {type(model.get_submodule(name)).__name__ for name in blocks.names} == {block}


def test_parse_blocks_reads_lists_ranges_and_negative_indices():
    assert parse_blocks("1, 3-4,-1", 6) == [1, 3, 4, 5]
    with pytest.raises(LayercritError, match="blocks 0-3, not 7"):
        parse_blocks("7", 4)
    with pytest.raises(LayercritError, match="all 4 blocks"):
        parse_blocks("0-3", 4)


def test_drop_blocks_equals_a_forward_that_skips_those_blocks(tiny_lm_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = gpt2_forward_without(model, {1, 2}, ids)
        pruned = drop_blocks(model, [1, 2])
        assert pruned.config.n_layer == 2
        assert torch.allclose(pruned(ids).logits, expected, atol=1e-5)


def test_pruned_llama_renumbers_its_layers_for_the_key_value_cache(tiny_llama_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    drop_blocks(model, [0, 2])
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert model.config.num_hidden_layers == 2
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    out = reloaded.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_prune_writes_a_loadable_model_without_the_blocks_and_reports_perplexity(capsys, tiny_lm_dir, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("def g(a):\n    return a * 2\n" * 40)
    code, out, err = run_cli(capsys, "prune", "--model", f"hf:{tiny_lm_dir}", "--drop", "1-2", "--out",
                             tmp_path / "pruned", "--data", text, "--seq-len", 16, "--windows", 8)
    assert code == 0, err
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert reloaded.config.n_layer == 2 and len(reloaded.transformer.h) == 2
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "pruned").vocab_size > 0
    assert "dropped blocks 1,2 of 4 (transformer.h)" in out
    before, after = out.split("perplexity on ")[1].split(": ")[-1].split(" -> ")
    assert float(before) > 1 and float(after) > 1 and float(before) != float(after)


def test_prune_refuses_blocks_the_model_does_not_have(capsys, tiny_lm_dir, tmp_path):
    code, _, err = run_cli(capsys, "prune", "--model", f"hf:{tiny_lm_dir}", "--drop", "9", "--out", tmp_path / "p")
    assert_one_line_error(code, err, "blocks 0-3, not 9")
