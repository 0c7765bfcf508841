"""Downloads of the paper zoo's weights retry, resume and check their sha256; Hub files go through
hf_hub_download, Google Drive files through gdown. No network: a bounded HTTP server on 127.0.0.1, and fakes of
hf_hub_download and gdown."""

import hashlib
import http.server
import sys
import threading
import types
from pathlib import Path

import pytest

from layercrit.errors import LayercritError
from layercrit.zoo import paper

DATA = bytes(range(256)) * 1200  # 300 KiB
DATA_SHA256 = hashlib.sha256(DATA).hexdigest()


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(paper, "RETRY_WAIT", 0.0)


@pytest.fixture
def server():
    """Serves DATA at /w.pth, honouring Range; ``plan`` lists how to answer each request in turn (``drop``: send
    half and close; ``ignore-range``: the whole file with 200; an int: that status), then answers normally."""
    state = types.SimpleNamespace(plan=[], requests=[])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state.requests.append(self.headers.get("Range"))
            how = state.plan.pop(0) if state.plan else "ok"
            if isinstance(how, int):
                self.send_error(how)
                return
            start = 0
            if self.headers.get("Range") and how != "ignore-range":
                start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            body = DATA[start:]
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if how == "drop" else body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.timeout = 5
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/w.pth"
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def published(monkeypatch, url, sha256=DATA_SHA256[:10], hub=None) -> paper.WeightFile:
    file = paper.WeightFile(url=url, cache_name="w.pth", sha256=sha256, layout=paper.Layout(name="plain"), hub=hub)
    monkeypatch.setattr(paper, "weight_files", lambda model_id: [file])
    return file


def test_a_dropped_download_resumes_where_it_stopped_with_a_range_request(monkeypatch, server):
    file = published(monkeypatch, server.url)
    server.plan = ["drop"]
    assert paper.download("m") == [file.path]
    assert file.path.read_bytes() == DATA
    assert server.requests == [None, f"bytes={len(DATA) // 2}-"]
    assert not file.path.with_name("w.pth.partial").exists()


def test_a_server_that_ignores_the_range_gives_the_whole_file_again(monkeypatch, server):
    file = published(monkeypatch, server.url)
    server.plan = ["drop", "ignore-range"]
    paper.download("m")
    assert file.path.read_bytes() == DATA and len(server.requests) == 2


def test_server_errors_are_retried_and_a_missing_file_is_not(monkeypatch, server):
    file = published(monkeypatch, server.url)
    server.plan = [503, 502]
    paper.download("m")
    assert file.path.read_bytes() == DATA and len(server.requests) == 3
    file.path.unlink()
    server.requests.clear()
    server.plan = [404]
    with pytest.raises(LayercritError) as error:
        paper.download("m")
    assert len(server.requests) == 1
    assert f"(HTTP 404 Not Found); offline, download {server.url} to {file.path}" in str(error.value)


def test_giving_up_after_every_try_says_how_many(monkeypatch, server):
    published(monkeypatch, server.url)
    server.plan = [503] * paper.ATTEMPTS
    with pytest.raises(LayercritError, match=rf"after {paper.ATTEMPTS} tries"):
        paper.download("m")
    assert len(server.requests) == paper.ATTEMPTS


def test_a_download_not_matching_its_checksum_is_refused_and_nothing_is_kept(monkeypatch, server):
    file = published(monkeypatch, server.url, sha256="0000000000")
    with pytest.raises(LayercritError, match=r"does not match its sha256 prefix 0000000000 \(its sha256 is "):
        paper.download("m")
    assert list(file.path.parent.iterdir()) == []


def test_hub_files_are_fetched_with_hf_hub_download_and_checked(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []
    blob = tmp_path / "hf-cache" / "blob"
    blob.parent.mkdir()
    blob.write_bytes(DATA)

    def fake(repo_id, filename, *, revision=None, **kwargs):
        calls.append((repo_id, filename, revision))
        return str(blob)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    (file,) = paper.weight_files("robust_resnet50_l2_eps3")
    assert file.hub == ("madrylab/robust-imagenet-models", "resnet50_l2_eps3.ckpt", "main")
    assert paper._ensure("robust_resnet50_l2_eps3", file) == file.path
    assert calls == [file.hub] and file.path.read_bytes() == DATA
    assert blob.read_bytes() == DATA  # the Hub's cache keeps its file

    checked = published(monkeypatch, "https://hub/x", sha256="ffffffff", hub=("o/r", "x", "main"))
    with pytest.raises(LayercritError, match=r"does not match its sha256 prefix ffffffff"):
        paper.download("m")
    assert not checked.path.exists() and blob.read_bytes() == DATA


def test_hub_offline_mode_fails_at_once_naming_the_file_to_download(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def offline(repo_id, filename, **kwargs):
        calls.append(filename)
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    file = published(monkeypatch, "https://huggingface.co/o/r/resolve/main/x", hub=("o/r", "x", "main"))
    with pytest.raises(LayercritError) as error:
        paper.download("m")
    assert calls == ["x"] and "\n" not in str(error.value)
    assert f"offline, download https://huggingface.co/o/r/resolve/main/x to {file.path}" in str(error.value)


def test_google_drive_downloads_resume_with_gdown(monkeypatch):
    calls = []

    def download(*, id, output, quiet, resume):
        calls.append((id, resume, Path(output).stat().st_size if Path(output).exists() else 0))
        with open(output, "ab") as out:
            out.write(DATA[: len(DATA) // 2])
        if len(calls) == 1:
            raise ConnectionResetError("connection reset by peer")
        return output

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download=download))
    file = published(monkeypatch, paper._GDRIVE + "abc")
    paper.download("m")
    assert calls == [("abc", True, 0), ("abc", True, len(DATA) // 2)]  # the second try continues the first
    assert file.path.read_bytes() == DATA


def test_the_paper_extra_brings_gdown_and_huggingface_hub():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert {"gdown", "huggingface_hub"} <= {name.split(">")[0].split("=")[0] for name in extras["paper"]}
