"""Shared fixtures: small models that are cheap to run on a 2-core CPU."""

import os

# Test tensors are tiny: one thread is faster than two, and far faster when other processes share the CPU.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from torch import nn

from layercrit.measurement.engine import keep_freed_memory
from layercrit.models import Preprocessing, wrap_module

torch.set_num_threads(1)
keep_freed_memory()  # as the command line does (a library call leaves the allocator alone): the tests measure a lot


class TinyCNN(nn.Module):
    """conv → bn → relu → conv → pool → fc, plus an unused branch (its output never reaches the logits)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.unused = nn.Conv2d(8, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        _ = self.unused(x)
        return self.fc(self.pool(self.relu(self.conv2(x))).flatten(1))


@pytest.fixture
def tiny_model():
    """A TinyCNN with non-trivial BN statistics, wrapped for measuring (input [0, 1], 1×16×16)."""
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.1, 0.1)
        model.bn1.running_var.uniform_(0.5, 1.5)
    pre = Preprocessing(resize=None, crop=None, mean=(0.5,), std=(0.25,), in_chans=1, source="test")
    return wrap_module(model.eval(), fresh=TinyCNN, preprocessing=pre, spec="test:tiny")


@pytest.fixture
def tiny_data():
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (48, 1, 16, 16), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (48,), generator=generator)
    return images, labels


def run_cli(capsys, *argv):
    """``layercrit ARGV...`` in this process: (exit status, stdout, stderr)."""
    from layercrit.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    """A user mistake: exit status 2 and one line ``layercrit: error: ...`` holding every fragment."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layercrit: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def without_warnings(err: str) -> str:
    """``err`` less its one-line warnings (``layercrit: warning: ...``), for a mistake found only after the
    measuring began (a full disk): the warnings about the measured model come first, each one line."""
    lines = err.strip().splitlines()
    assert all(line.startswith("layercrit: ") for line in lines), err  # no traceback, no two-line warning
    return "\n".join(line for line in lines if not line.startswith("layercrit: warning:"))


TINY_LM_TEXT = "\n".join(
    f"def f{i}(x, y):\n    \"\"\"Add {i} to x.\"\"\"\n    return x + y * {i}\n\nclass C{i}:\n    pass\n" for i in range(60))


def save_tiny_lm(folder, *, arch: str = "gpt2", n_layer: int = 4, seed: int = 0):
    """A tiny randomly initialised causal LM (GPT-2 or Llama) with a byte-level BPE tokenizer trained on
    :data:`TINY_LM_TEXT`, written with ``save_pretrained`` to ``folder``; returns the folder."""
    import transformers

    from layercrit.zoo.lm import train_tokenizer

    tokenizer = train_tokenizer([TINY_LM_TEXT], vocab_size=300)
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=len(tokenizer), n_layer=n_layer, n_embd=32, n_head=2,
                                         n_positions=32, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=n_layer, hidden_size=32,
                                          intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                                          max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
        model = transformers.LlamaForCausalLM(config)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """An uninterrupted sweep of test_sweep's CONFIG with one local worker: (config path, store path, results),
    built once for every test file that compares with it (tests copy the store before they write to it)."""
    from layercrit.sweeps.sweep import run_sweep

    from .test_sweep import write_config

    folder = tmp_path_factory.mktemp("reference")
    config = write_config(folder / "sweep.yaml")
    store = folder / "sweep.sqlite"
    return config, store, run_sweep(config, store, workers=1, progress=False)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A tiny GPT-2 (4 blocks, d=32, context 32) and its tokenizer as a save_pretrained folder."""
    pytest.importorskip("transformers")
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny Llama (4 blocks, d=32, grouped-query attention) and its tokenizer as a save_pretrained folder."""
    pytest.importorskip("transformers")
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


def gpt2_forward_without(model, dropped, ids):
    """GPT-2's forward written out by hand, running every block but ``dropped``."""
    t = model.transformer
    hidden = t.wte(ids) + t.wpe(torch.arange(ids.shape[1]))
    for i, block in enumerate(t.h):
        if i not in dropped:
            out = block(hidden)
            hidden = out[0] if isinstance(out, tuple) else out
    return model.lm_head(t.ln_f(hidden))
