"""Every language-model option of ``run`` (hf: model, text data) and ``prune`` given wrong: one line naming the
problem and its fix, exit status 2, never a traceback."""

import json

import pytest

from tests.conftest import TINY_LM_TEXT, assert_one_line_error, run_cli

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Text files good and bad, and a folder that is not empty."""
    folder = tmp_path_factory.mktemp("lm-options")
    paragraphs = TINY_LM_TEXT.split("\n\n")
    (folder / "code.txt").write_text(TINY_LM_TEXT)
    (folder / "empty.txt").write_text("")
    (folder / "code.jsonl").write_text("\n".join(json.dumps({"text": p}) for p in paragraphs))
    (folder / "body.jsonl").write_text("\n".join(json.dumps({"body": p}) for p in paragraphs))
    (folder / "broken.jsonl").write_text(json.dumps({"text": paragraphs[0]}) + "\n{not json\n")
    (folder / "full").mkdir()
    (folder / "full" / "config.json").write_text("{}")
    return folder


# (options replaced or added, the fragments the error line must hold); {files} is the folder above
COMMON = [
    (["--seq-len", "0"], ["--seq-len", "at least 1", "'0'"]),
    (["--seq-len", "-1"], ["--seq-len", "at least 1", "'-1'"]),
    (["--seq-len", "abc"], ["--seq-len", "at least 1", "'abc'"]),
    (["--seq-len", "100"], ["--seq-len=100", "context of 32 tokens", "--seq-len=32 or less"]),
    (["--data", "{files}/code.jsonl", "--text-field", "body"], ["no text field 'body'", "--text-field="]),
    (["--dtype", "bogus"], ["--dtype", "'bogus'", "float32"]),
    (["--windows", "0"], ["--windows", "at least 1", "'0'"]),
    (["--windows", "-5"], ["--windows", "at least 1", "'-5'"]),
    (["--data", "{files}/missing.txt"], ["data not found", "missing.txt", ".txt or .jsonl"]),
    (["--data", "{files}/empty.txt"], ["empty.txt", "fewer than --seq-len=16 tokens", "more text or lower --seq-len=16"]),
    (["--data", "{files}/body.jsonl"], ["no text field 'text'", "--text-field="]),
    (["--data", "{files}/broken.jsonl"], ["line 2 is not JSON", "one JSON object per line"]),
    (["--data", "hf-dataset:nobody/nothing"], ["HF_HUB_OFFLINE", "hf download --repo-type dataset nobody/nothing"]),
]
RUN_ONLY = [
    (["--groups", "window:0"], ["--groups='window:0'", "from 1 to the 4 blocks"]),
    (["--groups", "window:-1"], ["--groups='window:-1'", "from 1 to the 4 blocks"]),
    (["--groups", "window:x"], ["--groups='window:x'", "from 1 to the 4 blocks"]),
    (["--groups", "window:9"], ["--groups='window:9'", "from 1 to the 4 blocks"]),
]
PRUNE_ONLY = [
    (["--drop", "9"], ["--drop='9'", "blocks 0-3, not 9"]),
    (["--drop", "-9"], ["--drop='-9'", "blocks 0-3, not -9"]),
    (["--drop", "1,1"], ["--drop='1,1'", "block 1 twice", "name each block once"]),
    (["--drop", "1-2,2"], ["--drop='1-2,2'", "block 2 twice"]),
    (["--drop", "0-3"], ["--drop='0-3'", "all 4 blocks", "keep at least one"]),
    (["--drop", "x"], ["--drop='x'", "like 3,5 or 2-4"]),
    (["--out", "{files}/full"], ["--out=", "full", "not empty", "--force"]),
]
CASES = [("run", *case) for case in COMMON + RUN_ONLY] + [("prune", *case) for case in COMMON + PRUNE_ONLY]


def argv(command: str, changes: list[str], tiny_lm_dir, files, tmp_path) -> list:
    """The command's good options with ``changes`` replacing (or adding to) them."""
    options = {"--model": f"hf:{tiny_lm_dir}", "--data": files / "code.txt", "--windows": 4, "--seq-len": 16,
               "--out": tmp_path / "out"}
    if command == "run":
        options.update({"--groups": "blocks", "--reset": "skip", "--trials": 1})
    else:
        options["--drop"] = 1
    for flag, value in zip(changes[::2], changes[1::2], strict=True):
        options[flag] = value.format(files=files)
    return [command, *(str(x) for pair in options.items() for x in pair), *(["--quiet"] if command == "run" else [])]


@pytest.mark.parametrize(("command", "changes", "fragments"), CASES,
                         ids=[f"{c}{''.join(' ' + x for x in changes)}" for c, changes, _ in CASES])
def test_a_wrong_language_model_option_is_one_line_naming_the_problem_and_the_fix(
        command, changes, fragments, capsys, monkeypatch, tiny_lm_dir, files, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code, _, err = run_cli(capsys, *argv(command, changes, tiny_lm_dir, files, tmp_path))
    assert_one_line_error(code, err, *(f.format(files=files) for f in fragments))
    assert not (tmp_path / "out" / "results.csv").exists() and not (tmp_path / "out" / "config.json").exists()


def test_the_good_options_of_the_table_run(capsys, tiny_lm_dir, files, tmp_path):
    """The table's baseline: each case above fails only by what it changes."""
    for command in ("run", "prune"):
        code, _, err = run_cli(capsys, *argv(command, [], tiny_lm_dir, files, tmp_path / command))
        assert code == 0, err


def test_prune_reads_the_text_field_of_a_jsonl(capsys, tiny_lm_dir, files, tmp_path):
    code, out, err = run_cli(capsys, *argv("prune", ["--data", "{files}/body.jsonl", "--text-field", "body"],
                                           tiny_lm_dir, files, tmp_path))
    assert code == 0, err
    assert "body.jsonl" in out
