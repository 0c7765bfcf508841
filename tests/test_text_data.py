"""Text data: files, JSON lines, lists of texts and token ids → seeded windows of token ids, cached once."""

import json

import pytest
import torch

from tests.conftest import TINY_LM_TEXT

transformers = pytest.importorskip("transformers")

from layercrit.data.text import load_text, token_stream  # noqa: E402
from layercrit.errors import LayercritError  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_lm_dir)


def test_a_text_file_becomes_consecutive_windows_of_its_token_stream(tokenizer, tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TINY_LM_TEXT)
    data = load_text(path, tokenizer, seq_len=16, cache_dir=tmp_path / "cache")
    stream = tokenizer(TINY_LM_TEXT, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    windows = data.images["input_ids"]
    assert windows.shape == (len(stream) // 16, 16)
    assert sorted(windows.tolist()) == sorted(torch.tensor(stream[:len(windows) * 16]).view(-1, 16).tolist())
    assert torch.equal(data.images["attention_mask"], torch.ones_like(windows))
    assert (data.labels == -1).all() and len(data) == len(windows)


def test_the_window_subset_is_seeded(tokenizer, tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TINY_LM_TEXT)
    first, again, other = (load_text(path, tokenizer, seq_len=16, windows=5, seed=s, use_cache=False)
                           for s in (0, 0, 1))
    assert torch.equal(first.images["input_ids"], again.images["input_ids"]) and first.data_id == again.data_id
    assert not torch.equal(first.images["input_ids"], other.images["input_ids"])
    assert len(first) == 5


def test_json_lines_and_a_list_of_texts_give_the_same_windows(tokenizer, tmp_path):
    texts = [TINY_LM_TEXT[:900], TINY_LM_TEXT[900:2000]]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)))
    from_file = load_text(path, tokenizer, seq_len=16, text_field="body", use_cache=False)
    from_list = load_text(texts, tokenizer, seq_len=16, use_cache=False)
    assert torch.equal(from_file.images["input_ids"], from_list.images["input_ids"])


def test_json_lines_without_the_text_field_name_the_option(tokenizer, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "x"}))
    with pytest.raises(LayercritError, match="no text field 'text'.*text_field"):
        load_text(path, tokenizer, seq_len=16)


def test_token_ids_are_the_windows(tmp_path):
    ids = torch.arange(60).view(6, 10)
    data = load_text(ids, None, windows=4, seed=0)
    assert data.images["input_ids"].shape == (4, 10)
    assert {tuple(r) for r in data.images["input_ids"].tolist()} <= {tuple(r) for r in ids.tolist()}


def test_a_text_shorter_than_one_window_is_a_clear_error(tokenizer):
    with pytest.raises(LayercritError, match="fewer than seq_len=512 tokens"):
        load_text(["short text"], tokenizer, seq_len=512)


def test_the_token_stream_is_cached_and_read_back_without_tokenizing(tokenizer, tmp_path, monkeypatch):
    texts = [TINY_LM_TEXT]
    first = token_stream(texts, tokenizer, tmp_path)
    monkeypatch.setattr(type(tokenizer), "__call__", lambda *a, **k: pytest.fail("tokenized again"))
    assert torch.equal(token_stream(texts, tokenizer, tmp_path), first)


def test_an_uncached_hf_dataset_offline_is_one_line_naming_what_to_download(tokenizer, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(LayercritError, match="HF_HUB_OFFLINE is set.*hf download --repo-type dataset org/texts"):
        load_text("hf-dataset:org/texts/cfg:validation", tokenizer)


def test_python_stdlib_is_the_held_out_standard_library_modules(tokenizer):
    data = load_text("python-stdlib", tokenizer, seq_len=32, windows=3)
    assert "statistics" in data.description and data.images["input_ids"].shape == (3, 32)
