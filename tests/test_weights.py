"""ImageNet weights on demand, against HTTP servers on 127.0.0.1 only (never the internet).

Every test runs with a temporary TORCH_HOME (the conftest's session one, replaced per test
here) so the real torch hub cache is never read or written.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch  # noqa: E402

from napari_cpgcn.cli import main  # noqa: E402
from napari_cpgcn.events import EventKind  # noqa
from napari_cpgcn.models import Backbone, adapt_input_conv  # noqa: E402
from napari_cpgcn.models.backbone import imagenet_weight_candidates  # noqa: E402
from napari_cpgcn.models.weights import (  # noqa: E402
    WEIGHTS_TIMEOUT_ENV,
    WEIGHTS_URL_ENV,
    WeightsDownloadError,
    WeightsNotFoundError,
    WeightsOfflineError,
    download_weights,
    fetch_imagenet_weights,
    hub_checkpoint_dir,
    imagenet_weights_url,
    plan_imagenet_weights,
)
from napari_cpgcn.training.config import ImageModelConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hub_name(stem: str, data: bytes) -> str:
    """The torch hub file name of ``data``: ``stem-<first 8 hex digits of its sha256>.pth``."""
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"


def state_bytes(net: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    return buf.getvalue()


def files_under(folder: Path) -> list[str]:
    """Every file below ``folder`` (partial and temporary files included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def bounded(fn, limit: float = 15.0):
    """``fn()`` in a thread: its result, or its exception raised here; a test failure (not a
    hang of the suite) when it is still running after ``limit`` seconds."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    if t.is_alive():
        pytest.fail(f"still waiting after {limit:g} s: a silent server hangs the run")
    if "error" in out:
        raise out["error"]
    return out["value"]


class Server:
    """A threaded HTTP server on 127.0.0.1 serving ``files`` (URL path → bytes).

    ``stall_after`` (bytes) makes GET send the headers and that many bytes, then go silent
    until the server shuts down: a download broken off mid-way.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.stall_after: int | None = None
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _send_head(self) -> bytes | None:
                server.requests.append((self.command, self.path))
                data = server.files.get(self.path.split("?")[0])
                if data is None:
                    self.send_error(404)
                    return None
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                return data

            def do_HEAD(self):  # noqa: N802 - http.server's naming
                self._send_head()

            def do_GET(self):  # noqa: N802
                data = self._send_head()
                if data is None:
                    return
                if server.stall_after is None:
                    self.wfile.write(data)
                    return
                self.wfile.write(data[:server.stall_after])
                self.wfile.flush()
                server.release.wait(30)

            def log_message(self, *args):  # keep the test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def add(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return self.base + path

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def silent_port():
    """A port that accepts TCP connections and never sends a byte."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield sock.getsockname()[1]
    stop.set()
    t.join(2)
    for c in held:
        c.close()
    sock.close()


@pytest.fixture
def closed_port():
    """A loopback port bound but not listening: connections are refused at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture(autouse=True)
def torch_home(tmp_path, monkeypatch):
    """A fresh, empty torch hub cache for each test; the timeout short unless a test unsets it."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv(WEIGHTS_TIMEOUT_ENV, "1.5")
    monkeypatch.delenv(WEIGHTS_URL_ENV, raising=False)
    assert hub_checkpoint_dir() == home / "hub" / "checkpoints"
    return home


# ----------------------------------------------------------------------------- URLs

def test_urls_official_mirror_and_full(monkeypatch):
    official = imagenet_weights_url("resnet18")
    assert official.startswith("https://download.pytorch.org/models/resnet18-")
    assert official.endswith(imagenet_weight_candidates("resnet18")[0])
    # a mirror folder gets the torchvision file name; a query string stays at the end
    assert (imagenet_weights_url("resnet18", "http://mirror.example/torch/?k=1")
            == f"http://mirror.example/torch/{imagenet_weight_candidates('resnet18')[0]}?k=1")
    full = "http://mirror.example/x/my_resnet18-0123abcd.pth"
    assert imagenet_weights_url("resnet18", full) == full
    monkeypatch.setenv(WEIGHTS_URL_ENV, "http://mirror.example/models")
    assert imagenet_weights_url("resnet50") == "http://mirror.example/models/" + imagenet_weight_candidates("resnet50")[0]
    monkeypatch.setenv(WEIGHTS_URL_ENV, "none")
    assert imagenet_weights_url("resnet50") is None
    # a file name without a sha256 prefix cannot be verified: refused before any network
    for bad in ("http://mirror.example/resnet18.pth", "http://mirror.example/resnet18-.pth",
                "http://mirror.example/resnet18-0123abc.pth"):  # 7 hex digits: too short to check
        with pytest.raises(WeightsDownloadError, match="torch hub naming"):
            imagenet_weights_url("resnet18", bad)


# ----------------------------------------------------------------------------- downloads

def test_good_file_is_fetched_verified_and_cached(server, torch_home):
    data = b"weights " * 1000
    url = server.add("/models/" + hub_name("blob", data), data)
    path = download_weights(url, progress=False)
    assert path == hub_checkpoint_dir() / hub_name("blob", data)
    assert path.read_bytes() == data
    assert files_under(torch_home) == [f"hub/checkpoints/{path.name}"]
    n = len(server.requests)
    assert download_weights(url, progress=False) == path  # the cache: no second request
    assert len(server.requests) == n


def test_hash_mismatch_is_refused_and_leaves_nothing(server, torch_home):
    data = b"the real weights" * 500
    url = server.add("/models/" + hub_name("blob", data), b"a different file" * 500)
    with pytest.raises(WeightsDownloadError, match="SHA-256 does not start with") as err:
        download_weights(url, progress=False)
    assert "nothing was kept" in str(err.value)
    assert files_under(torch_home) == []  # no file, no .partial, no temporary file
    # the same through a backbone: a mirror serving another file under the official name
    server.add("/models/" + imagenet_weight_candidates("resnet18")[0], b"not resnet18")
    with pytest.raises(WeightsDownloadError, match="refused the download"):
        Backbone("resnet18", weights=server.base + "/models/")
    assert files_under(torch_home) == []


def test_missing_file_on_the_mirror_is_a_clear_error(server, torch_home):
    with pytest.raises(WeightsDownloadError, match="does not exist on the server"):
        fetch_imagenet_weights("resnet18", server.base + "/empty/")
    assert files_under(torch_home) == []


def test_silent_server_times_out_within_the_limit(silent_port, monkeypatch, torch_home):
    monkeypatch.delenv(WEIGHTS_TIMEOUT_ENV)  # the default timeout: the user-facing promise
    imagenet_weights_url("resnet18")  # import torchvision.models first: seconds on a busy machine, not network
    t0 = time.perf_counter()
    decision = bounded(lambda: fetch_imagenet_weights("resnet18", f"http://127.0.0.1:{silent_port}/models/"))
    elapsed = time.perf_counter() - t0
    assert elapsed < 10
    assert decision.status == "offline" and decision.weights is None
    assert "did not answer within 5 s" in decision.reason
    # the download itself (no reachability check first) also gives up instead of hanging
    url = f"http://127.0.0.1:{silent_port}/models/blob-0123abcd.pth"
    t0 = time.perf_counter()
    with pytest.raises(WeightsOfflineError, match="did not answer within 2 s"):
        bounded(lambda: download_weights(url, timeout=2, progress=False))
    assert time.perf_counter() - t0 < 4
    assert files_under(torch_home) == []


def test_download_broken_off_mid_way_leaves_nothing(server, torch_home):
    data = bytes(range(256)) * 400
    url = server.add("/models/" + hub_name("blob", data), data)
    server.stall_after = len(data) // 2
    t0 = time.perf_counter()
    with pytest.raises(WeightsOfflineError, match="download broken off"):
        bounded(lambda: download_weights(url, progress=False))
    assert time.perf_counter() - t0 < 6
    assert files_under(torch_home) == []
    # through fetch it is "offline": the run goes on from random weights
    decision = fetch_imagenet_weights("resnet18", url)
    assert decision.status == "offline" and "broken off" in decision.reason
    assert files_under(torch_home) == []


def test_unwritable_cache_is_a_clear_error(server, torch_home):
    data = b"w" * 100
    url = server.add("/models/" + hub_name("blob", data), data)
    (torch_home / "hub").mkdir(parents=True)
    (torch_home / "hub" / "checkpoints").write_text("a file where the cache folder should be")
    with pytest.raises(WeightsNotFoundError, match="cannot write the torch hub cache .* set TORCH_HOME"):
        fetch_imagenet_weights("resnet18", url)


def test_unreachable_address_fails_fast(closed_port, torch_home):
    imagenet_weights_url("resnet18")  # import torchvision.models outside the timing
    t0 = time.perf_counter()
    decision = fetch_imagenet_weights("resnet18", f"http://127.0.0.1:{closed_port}/models/")
    assert time.perf_counter() - t0 < 2
    assert decision.status == "offline" and "refused" in decision.reason
    msg = decision.message()
    # the message names what happens and what to do: the file name and folder, or a path
    assert msg.startswith("offline: no ImageNet weights for resnet18")
    assert "starting from random init" in msg
    assert f"put {imagenet_weight_candidates('resnet18')[0]} into {hub_checkpoint_dir()}" in msg
    assert "--imagenet-weights PATH" in msg
    assert decision.message(fallback="the self-supervised backbone of P") .count("self-supervised") == 1
    assert files_under(torch_home) == []


def test_downloads_off_means_cache_only(monkeypatch, torch_home):
    monkeypatch.setenv(WEIGHTS_URL_ENV, "none")
    t0 = time.perf_counter()
    decision = fetch_imagenet_weights("resnet18")
    assert time.perf_counter() - t0 < 1
    assert decision.status == "offline" and "downloads are off" in decision.reason


# ----------------------------------------------------------------------------- backbones

def test_backbone_downloads_from_a_mirror_and_adapts_the_stem(server, torch_home, caplog):
    import torchvision

    ref = torchvision.models.mobilenet_v3_small(weights=None)
    data = state_bytes(ref)
    name = hub_name("mobilenet_v3_small", data)
    url = server.add("/mirror/" + name, data)
    with caplog.at_level("INFO", logger="napari_cpgcn"):
        bb = Backbone("mobilenet_v3_small", weights=url)
    cached = hub_checkpoint_dir() / name
    assert bb.weights_source == str(cached)
    assert bb.weights_message == f"ImageNet weights for mobilenet_v3_small downloaded from {url} to {cached}"
    assert bb.weights_message in caplog.text
    state = ref.state_dict()
    # the RGB stem became a 4-channel one (timm's adaptation), the rest loaded as it is
    torch.testing.assert_close(bb.trunk[0][0].weight, adapt_input_conv(4, state["features.0.0.weight"]))
    torch.testing.assert_close(bb.trunk[3].block[0][0].weight, state["features.3.block.0.0.weight"])
    # a second backbone finds it in the cache: no download
    n = len(server.requests)
    bb2 = Backbone("mobilenet_v3_small", weights=url)
    assert len(server.requests) == n
    assert bb2.weights_message == f"ImageNet weights for mobilenet_v3_small from {cached}"


def test_default_imagenet_downloads_torchvisions_url(server, torch_home, monkeypatch):
    """``"imagenet"`` fetches the URL torchvision's weight enum names (here replaced by a
    loopback URL of the same form, since the real one is on the internet)."""
    import torchvision

    data = state_bytes(torchvision.models.mobilenet_v3_small(weights=None))
    url = server.add("/models/" + hub_name("mobilenet_v3_small", data), data)
    monkeypatch.setattr("napari_cpgcn.models.backbone.torchvision_weights_url", lambda name: url)
    assert plan_imagenet_weights("mobilenet_v3_small").status == "download"
    bb = Backbone("mobilenet_v3_small", weights="imagenet")
    assert "downloaded from " + url in bb.weights_message
    assert plan_imagenet_weights("mobilenet_v3_small").status == "cached"


def test_random_init_never_touches_the_network(server, monkeypatch):
    monkeypatch.setenv(WEIGHTS_URL_ENV, server.base + "/models")
    for weights in (None, "none", ""):
        bb = Backbone("resnet18", weights=weights)
        assert bb.weights_source == "random" and bb.weights_message == ""
    assert server.requests == []


def test_training_says_which_start_it_uses(tmp_path, closed_port, monkeypatch):
    from _tiny_hpa import make_tiny_dataset

    from napari_cpgcn.training.image_trainer import train_image_model

    monkeypatch.setenv(WEIGHTS_URL_ENV, f"http://127.0.0.1:{closed_port}/models")
    img_dir, csv = make_tiny_dataset(tmp_path / "data", n_images=6, size=32)
    cfg = ImageModelConfig(backbone="resnet18", variant="cnn", image_size=32, batch_size=4, epochs=1,
                           imagenet_weights="imagenet", device="cpu", seed=0, val_fraction=0.0)
    events = train_image_model(img_dir, csv, tmp_path / "run", cfg)
    messages = []
    for ev in events:  # only the start matters here
        if ev.kind == EventKind.LOG:
            messages.append(ev.message)
        if ev.kind in (EventKind.EPOCH_START, EventKind.BATCH):
            events.close()
            break
    decision = [m for m in messages if "ImageNet" in m]
    assert len(decision) == 1
    assert decision[0].startswith("offline: no ImageNet weights for resnet18 (connection to 127.0.0.1")
    assert "starting from random init" in decision[0]


def test_cli_refuses_an_unverifiable_url_before_training(tmp_path, server):
    from napari_cpgcn.cli import EXIT_USAGE

    (tmp_path / "train.csv").write_text("ID,Label\n")
    for cmd in ("train-image", "train"):
        code = main([cmd, str(tmp_path), "--labels", str(tmp_path / "train.csv"), "--out", str(tmp_path / cmd),
                     "--imagenet-weights", server.base + "/models/resnet18.pth", "-q"])
        assert code == EXIT_USAGE
    assert server.requests == []


# ----------------------------------------------------------------------------- info

def test_info_shows_cache_hit_download_and_offline(server, closed_port, torch_home, capsys, monkeypatch):
    ckpt = hub_checkpoint_dir()
    ckpt.mkdir(parents=True)
    (ckpt / imagenet_weight_candidates("resnet18")[0]).write_bytes(b"cached")
    server.add("/models/" + imagenet_weight_candidates("resnet34")[0], b"x" * 2_000_000)
    monkeypatch.setenv(WEIGHTS_URL_ENV, server.base + "/models")
    assert main(["info", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["imagenet_weights"]["plan"]
    assert plan["resnet18"]["status"] == "cached"
    assert plan["resnet18"]["path"] == str(ckpt / imagenet_weight_candidates("resnet18")[0])
    assert plan["resnet34"]["status"] == "download"
    assert plan["resnet34"]["url"] == server.base + "/models/" + imagenet_weight_candidates("resnet34")[0]
    assert plan["resnet34"]["size"] == 2_000_000
    assert plan["resnet50"]["status"] == "refused" and "does not exist on the server" in plan["resnet50"]["reason"]
    assert not any(method == "GET" for method, _ in server.requests)  # info downloads nothing
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "would be downloaded from " + server.base in out and "(2.0 MB)" in out
    # offline: one wait for the host, not one per backbone
    t0 = time.perf_counter()
    assert main(["info", "--imagenet-weights", f"http://127.0.0.1:{closed_port}/models"]) == 0
    assert time.perf_counter() - t0 < 5
    out = capsys.readouterr().out
    assert "offline: no ImageNet weights for resnet50 (connection to 127.0.0.1" in out
    assert files_under(torch_home) == [f"hub/checkpoints/{imagenet_weight_candidates('resnet18')[0]}"]
