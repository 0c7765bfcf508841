"""Fitting the ecosystem: Hugging Face Hub specs and offline behaviour, the user's own model factories, torch
datasets, and the command line's conventions. No test touches the network: the Hub is a cache folder built here,
a local HTTP server, or a probe replaced by one that says "unreachable"."""

import http.server
import socket
import threading
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from layercrit import hub
from layercrit.errors import LayercritError
from layercrit.models import build_architecture, resolve_model

# ---------------------------------------------------------------- Hugging Face Hub, offline


@pytest.fixture
def hf_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache of our own, the Hub online as far as the flag goes, and no probe result kept."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read by huggingface_hub at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_probed", {})
    return cache


@pytest.fixture
def unreachable(monkeypatch):
    """The Hub does not answer; the calls to the probe are counted."""
    calls = []
    monkeypatch.setattr(hub, "reachable", lambda url, timeout=hub.PROBE_TIMEOUT_S: calls.append(url) or False)
    return calls


def _cache_repo(cache, repo_id: str, files: dict) -> None:
    """Lay out files as huggingface_hub caches a download of ``repo_id`` at revision main."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, write in files.items():
        write(snapshot / name)


def _cache_timm_repo(cache, repo_id: str, model) -> None:
    from timm.models._hub import save_for_hf

    staging = cache.parent / "staging"
    save_for_hf(model, str(staging), safe_serialization=True)
    _cache_repo(cache, repo_id, {name: (lambda path, name=name: path.write_bytes((staging / name).read_bytes()))
                                 for name in ("config.json", "model.safetensors")})


def test_unknown_timm_tag_lists_the_model_s_tags_without_going_online(monkeypatch):
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: pytest.fail("an unknown tag needs no network"))
    with pytest.raises(LayercritError) as info:
        resolve_model("timm:resnet50.nonexistent_tag")
    message = str(info.value)
    assert "no pretrained weights resnet50.nonexistent_tag" in message and "a1_in1k" in message
    assert "offline" not in message and "\n" not in message


def test_a_close_tag_is_suggested_first(monkeypatch):
    with pytest.raises(LayercritError, match=r"the tags of resnet50 are a1_in1k,"):
        resolve_model("timm:resnet50.a1_in1", pretrained=False)


def test_weights_not_cached_and_hub_unreachable_fail_at_once_saying_what_to_download_where(hf_cache, unreachable):
    start = time.monotonic()
    with pytest.raises(LayercritError) as info:
        resolve_model("timm:resnet10t.c3_in1k")
    message = str(info.value)
    assert time.monotonic() - start < 5 and len(unreachable) == 1
    assert "huggingface.co does not answer" in message
    assert "hf download timm/resnet10t.c3_in1k" in message and f"into {hf_cache}" in message
    assert "--arch timm:resnet10t.c3_in1k" in message and "HF_HUB_OFFLINE=1" in message and "\n" not in message


def test_hf_hub_offline_flag_skips_the_probe(hf_cache, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: pytest.fail("HF_HUB_OFFLINE=1 must not probe"))
    with pytest.raises(LayercritError, match="HF_HUB_OFFLINE is set; on a machine that is online run `hf download"):
        resolve_model("timm:resnet10t.c3_in1k")


def test_cached_timm_weights_load_from_the_cache_alone_when_the_hub_is_unreachable(hf_cache, unreachable):
    import huggingface_hub.constants

    torch.manual_seed(3)
    trained = timm.create_model("resnet10t")
    _cache_repo(hf_cache, "timm/resnet10t.c3_in1k",
                {"model.safetensors": lambda path: save_file(trained.state_dict(), str(path))})
    start = time.monotonic()
    resolved = resolve_model("timm:resnet10t.c3_in1k")
    assert time.monotonic() - start < 10  # no minute of retries
    loaded = resolved.model.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.state_dict().items())
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # offline only while reading the cache


def test_hf_hub_spec_builds_the_repo_s_architecture_weights_and_preprocessing(hf_cache, unreachable):
    torch.manual_seed(4)
    trained = timm.create_model("resnet10t", num_classes=5)
    trained.pretrained_cfg = {**trained.pretrained_cfg, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    _cache_timm_repo(hf_cache, "someone/tiny-resnet", trained)
    for spec in ("hf-hub:someone/tiny-resnet", "timm:hf-hub:someone/tiny-resnet"):
        resolved = resolve_model(spec)
        assert resolved.num_classes == 5 and resolved.spec == spec
        loaded = resolved.model.model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in trained.state_dict().items())
        assert resolved.model.mean.flatten().tolist() == [0.5, 0.5, 0.5]
        fresh = resolved.fresh().model
        assert fresh.fc.out_features == 5 and not torch.equal(fresh.fc.weight, trained.fc.weight)


def test_hf_hub_spec_without_a_cached_config_names_the_repo(hf_cache, unreachable):
    with pytest.raises(LayercritError, match=r"cannot download the config of hf-hub:someone/absent: .*"
                                             r"hf download someone/absent"):
        resolve_model("hf-hub:someone/absent", pretrained=False)


class _Unauthorized(http.server.BaseHTTPRequestHandler):
    """What the Hub answers for a private repo without a token (and for one that does not exist)."""

    def do_HEAD(self):
        self.send_response(401)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


@pytest.fixture
def local_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_private_or_missing_repo_says_how_to_log_in(hf_cache, local_server, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", local_server)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", local_server)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        local_server + "/{repo_id}/resolve/{revision}/{filename}")
    with pytest.raises(LayercritError) as info:
        resolve_model("hf-hub:someone/private-net")
    assert "no Hugging Face repo someone/private-net (or it is private)" in str(info.value)
    assert "HF_TOKEN" in str(info.value) and "\n" not in str(info.value)


def test_the_probe_counts_any_http_answer_and_gives_up_on_silence(local_server, monkeypatch):
    monkeypatch.setattr(hub, "_probed", {})
    assert hub.reachable(local_server + "/some/file")  # a 401 is an answer
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    start = time.monotonic()
    assert not hub.reachable(f"http://127.0.0.1:{port}/x", timeout=1.0)
    assert time.monotonic() - start < 2


def test_a_bare_timm_name_suggests_its_source():
    with pytest.raises(LayercritError, match=r"unknown model spec 'resnet18' \(did you mean timm:resnet18\?\)"):
        resolve_model("resnet18", pretrained=False)


# ---------------------------------------------------------------- the user's own code


NETS = '''
import torch
from torch import nn

IMPORTED = True


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def build(num_classes=10):
    return Net(num_classes)


def build_trained(pretrained=True):
    net = Net()
    if pretrained:
        with torch.no_grad():
            net.fc.bias.fill_(7.0)
    return net
'''


@pytest.fixture
def nets_file(tmp_path):
    path = tmp_path / "nets.py"
    path.write_text(NETS)
    return path


def test_file_factory_with_pretrained_builds_the_trained_model_and_fresh_instances(nets_file):
    resolved = resolve_model(f"{nets_file}:build_trained")
    assert torch.all(resolved.model.model.fc.bias == 7.0)
    assert not torch.all(resolved.fresh().model.fc.bias == 7.0)
    assert resolved.preprocessing.in_chans == 1 and len(resolved.preprocessing.mean) == 1


def test_module_factory_as_the_architecture_of_a_checkpoint(nets_file, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(nets_file.parent))
    import nets

    trained = nets.build(num_classes=4)
    torch.save(trained.state_dict(), tmp_path / "ckpt.pth")
    resolved = resolve_model(str(tmp_path / "ckpt.pth"), arch="nets:build")
    assert resolved.num_classes == 4  # read from the checkpoint, passed to the factory
    assert torch.equal(resolved.model.model.fc.weight, trained.fc.weight)
    assert resolved.fresh().model.fc.out_features == 4


def test_factory_without_pretrained_asks_for_the_weights(nets_file):
    with pytest.raises(LayercritError, match=r"takes no 'pretrained' argument.*--model CKPT --arch .*nets.py:build"):
        resolve_model(f"{nets_file}:build")
    assert resolve_model(f"{nets_file}:build", pretrained=False).num_classes == 10


@pytest.mark.parametrize("spec, message", [
    ("{dir}/absent.py:build", "no Python file"),
    ("{dir}/nets.py:missing", "has no 'missing'"),
    ("{dir}/nets.py:IMPORTED", "is a bool, not a function or class"),
])
def test_factory_mistakes_are_one_line(nets_file, spec, message):
    with pytest.raises(LayercritError, match=message) as info:
        resolve_model(spec.format(dir=nets_file.parent), pretrained=False)
    assert "\n" not in str(info.value)


def test_code_named_in_a_file_the_user_did_not_write_is_never_imported(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef build():\n    pass\n")
    with pytest.raises(LayercritError, match="names Python code"):
        build_architecture(f"{tmp_path}/evil.py:build", pretrained=False)  # what a zoo manifest's arch goes through
    assert not marker.exists()


def test_cli_runs_a_factory_named_on_the_command_line(nets_file, tmp_path, capsys):
    from layercrit.cli import main

    code = main(["run", "--model", f"{nets_file}:build_trained", "--data", "fashion-mnist", "--images", "16",
                 "--trials", "1", "--layers", "fc", "--batch-size", "16", "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "out")])
    assert code == 0 and (tmp_path / "out" / "results.csv").is_file()
    assert "nets.py:build_trained" in capsys.readouterr().out
