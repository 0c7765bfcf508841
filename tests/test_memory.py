"""The memory a run needs, estimated and printed before it starts."""

import json

import pytest

from layercrit.measurement import memory
from layercrit.measurement.memory import estimate_memory
from layercrit.measurement.prepare import prepare
from layercrit.spec import Experiment
from tests.conftest import TINY_LM_TEXT, run_cli


def prepared(tiny_model, tiny_data, **options):
    return prepare(tiny_model, tiny_data, Experiment(**{"trials": 2, "batch_size": 8, **options}))


def test_weights_part_is_the_exact_bytes_of_parameters_and_buffers(tiny_model, tiny_data):
    tensors = {id(t): t for t in [*tiny_model.model.parameters(), *tiny_model.model.buffers()]}
    exact = sum(t.numel() * t.element_size() for t in tensors.values())
    assert estimate_memory(prepared(tiny_model, tiny_data)).weights == exact > 0


def test_activation_and_cache_parts_grow_linearly_with_the_batch_size(tiny_model, tiny_data):
    small = estimate_memory(prepared(tiny_model, tiny_data, batch_size=4))
    large = estimate_memory(prepared(tiny_model, tiny_data, batch_size=16))
    assert small.activations > 0 and large.activations == pytest.approx(4 * small.activations, rel=1e-3)
    assert small.cache > 0 and large.cache == pytest.approx(4 * small.cache, rel=1e-3)
    assert large.weights == small.weights and large.reset == small.reset


def test_reset_part_holds_each_trials_new_state_and_one_trained_copy(tiny_model, tiny_data):
    one, three = (prepared(tiny_model, tiny_data, trials=t) for t in (1, 3))
    modules = [one.model.model.get_submodule(m) for target in one.targets for m in target.modules]
    targets = sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])
    assert estimate_memory(one).reset == 2 * targets and estimate_memory(three).reset == 4 * targets


def test_a_skip_holds_only_the_trained_copy(tiny_lm_dir, text_file):
    skip, zero = (prepare(f"hf:{tiny_lm_dir}", str(text_file), Experiment(
        trials=2, batch_size=4, images=4, seq_len=16, groups="blocks", reset=reset)) for reset in ("skip", "zero"))
    assert 0 < estimate_memory(skip).reset == estimate_memory(zero).reset / 3


def test_the_naive_engine_records_nothing_to_replay(tiny_model, tiny_data):
    assert estimate_memory(prepared(tiny_model, tiny_data, engine="naive")).cache == 0


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "code.txt"
    path.write_text(TINY_LM_TEXT)
    return path


def run_lm(capsys, tiny_lm_dir, text_file, out):
    pytest.importorskip("transformers")
    return run_cli(capsys, "run", "--model", f"hf:{tiny_lm_dir}", "--data", text_file, "--seq-len", 16,
                   "--windows", 6, "--groups", "blocks", "--reset", "skip", "--trials", 1, "--out", out, "--quiet")


def test_run_prints_the_memory_it_needs_before_measuring_and_records_it(capsys, tiny_lm_dir, text_file, tmp_path):
    code, out, err = run_lm(capsys, tiny_lm_dir, text_file, tmp_path / "run")
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("memory needed: about "))
    assert out.index(line) < out.index("original:")  # before the results
    for part in ("weights", "reset", "data", "cache", "activations", "logits", "scoring"):
        assert f"{part} " in line
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["memory"]
    parts = {k: v for k, v in recorded.items() if k not in ("total", "needed")}
    assert recorded["total"] == sum(parts.values()) > recorded["weights"] > 0
    assert recorded["needed"] == {"cpu": recorded["total"]}  # a CPU run needs it all in one place
    assert "this run needs" not in err


def test_run_warns_in_one_line_when_the_device_has_less_memory_than_needed(capsys, tiny_lm_dir, text_file,
                                                                           tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: 1024)
    code, _, err = run_lm(capsys, tiny_lm_dir, text_file, tmp_path / "run")
    assert code == 0, err
    warning = [line for line in err.splitlines() if "this run needs about" in line]
    assert len(warning) == 1 and warning[0].startswith("layercrit: warning:")
    assert "1.0 KiB available on cpu" in warning[0] and "lower --batch-size, --windows, --seq-len" in warning[0]


def test_a_causal_lm_counts_a_batch_of_logits_at_every_position_over_the_vocabulary(tiny_lm_dir, text_file):
    lm = prepare(f"hf:{tiny_lm_dir}", str(text_file), Experiment(
        trials=1, batch_size=4, images=4, seq_len=16, groups="blocks", reset="skip"))
    vocab = lm.model.model.config.vocab_size
    clean_and_reset = 2 * 4 * 15 * vocab * 4  # windows × predicted positions × vocabulary, float32
    estimate = estimate_memory(lm)
    assert estimate.logits == clean_and_reset
    assert estimate.scoring > 2 * clean_and_reset  # softmaxes and log-softmaxes of both, and their difference


def test_on_a_gpu_the_scoring_and_a_naive_runs_images_are_needed_in_host_memory_not_on_the_device(
        tiny_model, tiny_data, monkeypatch):
    fast = estimate_memory(prepared(tiny_model, tiny_data))
    naive = estimate_memory(prepared(tiny_model, tiny_data, engine="naive"))
    assert fast.needed("cpu") == {"cpu": fast.total}
    assert fast.needed("cuda:1") == {"cuda:1": fast.total - fast.scoring, "cpu": fast.scoring}
    assert naive.needed("cuda") == {"cuda": naive.total - naive.scoring - naive.data, "cpu": naive.scoring + naive.data}
    device_part = fast.total - fast.scoring
    free = {"cuda:1": device_part, "cpu": 10**12}  # just enough on the GPU: the host part does not count there
    monkeypatch.setattr(memory, "available_memory", lambda place: free[place])
    assert memory.memory_warning(fast, "cuda:1", text=False) is None
    free["cuda:1"] = device_part - 1
    warning = memory.memory_warning(fast, "cuda:1", text=False)
    assert "available on cuda:1" in warning and "lower --batch-size, --images" in warning
    free.update({"cuda:1": 10**12, "cpu": fast.scoring - 1})  # the host's share is checked against the host
    assert "available on cpu" in memory.memory_warning(fast, "cuda:1", text=False)
    assert "on cuda:1" in fast.line("cuda:1") and "on cpu" in fast.line("cuda:1") and " on " not in fast.line()
