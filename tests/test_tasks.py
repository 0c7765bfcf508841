"""The task seam: models that do not take images, or do not return a bare tensor, are measured by the same engine,
and the fast engine gives exactly the naive engine's numbers for them."""

from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from torch import nn

import layercrit
from layercrit.columns import METRIC_COLUMNS
from layercrit.errors import LayercritError
from layercrit.measurement.tasks import Task, output_logits

VOCAB, CLASSES, LENGTH = 50, 4, 12


class TinySequenceClassifier(nn.Module):
    """Token ids N×T → embedding → two linear layers per token → mean over the (unmasked) tokens → class logits."""

    def __init__(self, returns: str = "tensor"):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.mix = nn.Linear(16, 16)
        self.act = nn.ReLU()
        self.head = nn.Linear(16, CLASSES)
        self.returns = returns

    def forward(self, input_ids, attention_mask=None):
        h = self.act(self.mix(self.embed(input_ids)))
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        logits = self.head(pooled)
        if self.returns == "tuple":
            return (logits, pooled)
        if self.returns == "output":
            return Output(logits=logits, hidden=pooled)
        return logits


@dataclass
class Output:
    """A stand-in for transformers' ModelOutput: named outputs, the logits among them."""

    logits: torch.Tensor
    hidden: torch.Tensor


class TinyLanguageModel(nn.Module):
    """Token ids → next-token logits at every position (N×T×VOCAB)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.mix(self.embed(input_ids))))


class NextToken(Task):
    """A per-position task as a language model's would be: every counted position's next-token distribution,
    the padding masked out; the truth is the next token, not the example's label."""

    name = "test-next-token"

    def predictions(self, output, inputs, labels):
        logits = output_logits(output)[:, :-1]
        counted = inputs["attention_mask"][:, 1:].bool()
        return logits[counted], inputs["input_ids"][:, 1:][counted]


def build(returns="tensor"):
    return lambda: TinySequenceClassifier(returns)


@pytest.fixture(scope="module")
def tokens():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (40, LENGTH), generator=generator)
    mask = torch.ones_like(ids)
    for i in range(40):
        mask[i, 4 + i % (LENGTH - 4):] = 0  # sequences of 4 to 11 tokens, padded
    labels = torch.randint(0, CLASSES, (40,), generator=generator)
    return ids, mask, labels


def trained(factory, seed=0):
    """A model whose predictions are far from uniform, as a trained one's are."""
    torch.manual_seed(seed)
    model = factory().eval()
    with torch.no_grad():
        model.head.weight.mul_(8.0)
    return model


def both_engines(model, data, **options):
    fast = layercrit.measure(model, data, engine="fast", channels_last=False, fold_bn=False, batch_size=16,
                             progress=False, **options)
    naive = layercrit.measure(model, data, engine="naive", batch_size=16, progress=False, **options)
    return fast, naive


def assert_identical(fast: pd.DataFrame, naive: pd.DataFrame) -> None:
    assert list(fast.layer) == list(naive.layer)
    pd.testing.assert_frame_equal(fast[list(METRIC_COLUMNS)], naive[list(METRIC_COLUMNS)], check_exact=True)
    assert fast.criticality.iloc[1:].max() > 0  # the resets did something


def test_a_sequence_classifier_over_token_ids_gets_identical_rows_from_both_engines(tokens):
    ids, _, labels = tokens
    fast, naive = both_engines(trained(build()), (ids, labels), task="sequence-classification", layers="linear",
                               trials=2, fresh_model=build())
    assert_identical(fast, naive)
    assert list(fast.layer.unique()) == ["original", "mix", "head"]
    assert (fast.n_images == 40).all()


@pytest.mark.parametrize("returns", ["tuple", "output"])
def test_dict_batches_and_tuple_or_model_output_outputs_are_measured_like_a_tensor(tokens, returns):
    ids, mask, labels = tokens
    data = ({"input_ids": ids, "attention_mask": mask}, labels)
    plain = layercrit.measure(trained(build()), data, task="sequence-classification", layers="linear", trials=1,
                              fresh_model=build(), batch_size=16, progress=False)
    fast, naive = both_engines(trained(build(returns)), data, task="sequence-classification", layers="linear",
                               trials=1, fresh_model=build(returns))
    assert_identical(fast, naive)
    pd.testing.assert_frame_equal(fast[list(METRIC_COLUMNS)], plain[list(METRIC_COLUMNS)], check_exact=True)


def test_a_per_position_task_compares_every_counted_position_with_both_engines_alike(tokens):
    ids, mask, _ = tokens
    data = ({"input_ids": ids, "attention_mask": mask}, torch.zeros(len(ids), dtype=torch.long))
    fast, naive = both_engines(trained(TinyLanguageModel), data, task=NextToken(), layers="linear", trials=2,
                               fresh_model=TinyLanguageModel)
    assert_identical(fast, naive)
    assert (fast.n_images == int(mask[:, 1:].sum())).all()  # one item per counted position, not per sequence


def test_token_ids_given_to_the_image_task_are_refused_naming_the_task(tokens):
    ids, _, labels = tokens
    with pytest.raises(LayercritError, match="sequence-classification"):
        layercrit.measure(trained(build()), (ids, labels), layers="linear", trials=1, progress=False)


def test_an_unknown_task_is_refused_listing_the_tasks(tokens):
    ids, _, labels = tokens
    with pytest.raises(LayercritError, match="image-classification, sequence-classification"):
        layercrit.measure(trained(build()), (ids, labels), task="tagging", layers="linear", progress=False)


def test_an_output_without_logits_is_a_one_line_error():
    with pytest.raises(LayercritError, match="no logits"):
        output_logits({"hidden": torch.zeros(2)})


@pytest.fixture(scope="module")
def gpt2_classifier():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=LENGTH,
                                     num_labels=CLASSES, pad_token_id=0)

    def build():
        return transformers.GPT2ForSequenceClassification(config).eval()

    torch.manual_seed(0)
    model = build()
    with torch.no_grad():
        model.score.weight.mul_(20.0)
    return model, build


def test_a_transformers_model_with_dict_batches_and_model_output_gets_identical_rows_from_both_engines(
        tokens, gpt2_classifier):
    ids, mask, labels = tokens
    model, build = gpt2_classifier
    data = ({"input_ids": ids, "attention_mask": mask}, labels)
    fast, naive = both_engines(model, data, task="sequence-classification", trials=1, fresh_model=build,
                               layers="transformer.h.1.*,score")
    assert_identical(fast, naive)
    assert {"transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc", "score"} <= set(fast.layer)


def test_transformers_conv1d_counts_as_linear_and_gpt2s_tied_head_is_found():
    transformers = pytest.importorskip("transformers")
    from layercrit.measurement.layers import select_targets
    from layercrit.measurement.prepare import tied_parameters

    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=LENGTH)
    model = transformers.GPT2LMHeadModel(config).eval()
    targets = select_targets(model)  # the default kinds it has: linear (Conv1D and Linear); no conv, no error
    names = [t.name for t in targets]
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                     "transformer.h.0.mlp.c_proj", "lm_head"]
    assert tied_parameters(model, targets) == {"lm_head": ["transformer.wte"]}
