"""Cellpose weights on demand: fetched from a server on 127.0.0.1, fast failure offline."""

from __future__ import annotations

import time

import pytest
from _weight_server import stalled_host, weight_server  # noqa: F401 - fixtures

from napari_cpgcn.segmentation import cellpose_backend as cb
from napari_cpgcn.segmentation import resolve_cellpose_weights

pytestmark = pytest.mark.skipif(cb.cellpose_major_version() is None, reason="cellpose not installed")

#: The start of a torch zip checkpoint, then filler: enough for the file-type check.
FAKE_MODEL = b"PK\x03\x04" + bytes(range(256)) * 64


@pytest.fixture(autouse=True)
def _no_internet(monkeypatch):
    monkeypatch.setenv("NAPARI_CPGCN_CELLPOSE_URL", "http://127.0.0.1:9/models")
    monkeypatch.delenv("NAPARI_CPGCN_CELLPOSE_DOWNLOAD", raising=False)


@pytest.mark.slow  # imports cellpose (and torch) for its downloader: ~20 s on a cold 2-core machine
def test_missing_model_is_fetched_once_into_the_models_folder(tmp_path, weight_server, capfd):  # noqa: F811
    url, requests = weight_server({"cyto3": FAKE_MODEL, "nucleitorch_0": FAKE_MODEL[::-1][:-4] + b"\x80"})
    models = tmp_path / "cellpose-models"
    path = resolve_cellpose_weights("cyto3", models, url_base=url)
    assert path == models / "cyto3" and path.read_bytes() == FAKE_MODEL
    assert requests == ["/cyto3"]
    assert "B/s" in capfd.readouterr().err  # cellpose's tqdm progress bar
    assert not [p for p in models.iterdir() if p.name != "cyto3"]  # no temporary file left
    assert resolve_cellpose_weights("cyto3", models, url_base=url) == path
    assert requests == ["/cyto3"]  # cached: not fetched again


def test_url_base_and_models_folder_from_the_environment(tmp_path, weight_server, monkeypatch):  # noqa: F811
    url, requests = weight_server({"cyto3": FAKE_MODEL})
    monkeypatch.setenv("NAPARI_CPGCN_CELLPOSE_URL", url + "/")
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path / "env-models"))
    assert resolve_cellpose_weights("cyto3") == tmp_path / "env-models" / "cyto3"
    assert cb.cellpose_url_base() == url and requests == ["/cyto3"]


def test_default_url_base_is_cellposes_own(monkeypatch):
    monkeypatch.delenv("NAPARI_CPGCN_CELLPOSE_URL")
    assert cb.cellpose_url_base().startswith("https://www.cellpose.org")  # read from cellpose, no network


@pytest.mark.slow  # imports cellpose for its downloader
def test_server_errors_and_non_model_answers_are_explained(tmp_path, weight_server):  # noqa: F811
    url, _ = weight_server({"cyto3": b"<html>proxy login</html>"})
    with pytest.raises(FileNotFoundError, match=r"404.*place it as .*nucleitorch_0"):
        resolve_cellpose_weights("nuclei", tmp_path, url_base=url)
    with pytest.raises(FileNotFoundError, match="did not return a model file"):
        resolve_cellpose_weights("cyto3", tmp_path, url_base=url)
    assert not (tmp_path / "cyto3").exists()


def test_offline_fails_within_seconds_with_the_place_to_put_the_file(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        resolve_cellpose_weights("cyto3", tmp_path / "m")  # the env's closed port on 127.0.0.1
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert "offline" in msg and str(tmp_path / "m" / "cyto3") in msg and "CELLPOSE_LOCAL_MODELS_PATH" in msg


def test_unreachable_host_times_out_instead_of_hanging(tmp_path, stalled_host):  # noqa: F811
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="offline"):
        resolve_cellpose_weights("cyto3", tmp_path, url_base=stalled_host, timeout=1.0)
    assert time.perf_counter() - t0 < 5


def test_downloads_can_be_switched_off(tmp_path, weight_server, monkeypatch):  # noqa: F811
    url, requests = weight_server({"cyto3": FAKE_MODEL})
    with pytest.raises(FileNotFoundError, match="downloads are off"):
        resolve_cellpose_weights("cyto3", tmp_path, url_base=url, download=False)
    monkeypatch.setenv("NAPARI_CPGCN_CELLPOSE_DOWNLOAD", "0")
    with pytest.raises(FileNotFoundError, match="downloads are off"):
        resolve_cellpose_weights("cyto3", tmp_path, url_base=url)
    assert requests == []


def test_folder_run_fetches_once_before_the_first_image(tmp_path, weight_server):  # noqa: F811
    """``iter_segment_folder`` resolves (fetches) the weights up front, so a missing file is one clear error."""
    from napari_cpgcn.segmentation.folder import iter_segment_folder

    url, requests = weight_server({})
    (tmp_path / "imgs").mkdir()
    for c in ("red", "green", "blue", "yellow"):
        (tmp_path / "imgs" / f"a_{c}.png").write_bytes(b"")  # never read: the weights fail first
    with pytest.raises(FileNotFoundError, match="404"):
        next(iter_segment_folder(tmp_path / "imgs", tmp_path / "out", "cellpose", models_dir=str(tmp_path / "m"),
                                 url_base=url))
    assert requests == ["/cyto3"]
