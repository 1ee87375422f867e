"""Shared fixtures: paths to the real HPA samples in ../shared/data and small synthetic data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# GUI tests load Mesa's software OpenGL (libLLVM) into this process; loading Triton's own LLVM
# after it (torchvision imports torch._dynamo, which imports triton) segfaults. The plugin never
# uses torch.compile, and its widgets hide triton the same way (widgets.common.prepare_torch);
# here it is hidden for the whole session, whatever order the tests run in.
sys.modules.setdefault("triton", None)  # type: ignore[arg-type]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NAPARI_CPGCN_SHARED_DATA", REPO.parent / "shared" / "data"))
HPA_SAMPLES = SHARED_DATA / "hpa-samples"

KAGGLE2021_IDS = ("000a6c98-bb9b-11e8-b2b9-ac1f6b6435d0", "b6a469d8-bbad-11e8-b2ba-ac1f6b6435d0")
KAGGLE2018_ID = "837e738c-bba8-11e8-b2ba-ac1f6b6435d0"
ARCHIVE_JPEG_IDS = ("800_A6_1", "B2AI_1_Paclitaxel_C1_R1_z01")


@pytest.fixture(scope="session")
def hpa_samples() -> Path:
    """The folder of real HPA images (skips when the shared data is absent)."""
    if not HPA_SAMPLES.is_dir():
        pytest.skip(f"shared data not found at {HPA_SAMPLES}")
    return HPA_SAMPLES


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def no_internet_weights(tmp_path_factory):
    """Every test: an empty temporary torch hub cache (TORCH_HOME) and an ImageNet weight URL on
    a loopback port that refuses connections, so a backbone built with ``"imagenet"`` never
    reads the real cache nor reaches the internet (it logs "offline" at once). The port is held
    bound but not listening for the session, so no other process can answer on it. Tests of
    downloads (tests/test_weights.py) set their own loopback server."""
    import socket

    closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    closed.bind(("127.0.0.1", 0))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        mp.setenv("NAPARI_CPGCN_WEIGHTS_URL", f"http://127.0.0.1:{closed.getsockname()[1]}/models")
        yield
    closed.close()


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread (several times faster than two oversubscribed ones on
    a busy 2-core CI machine), restoring the previous count afterwards. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic data set with per-cell truth (8 images, 96 px), shared by the session."""
    from napari_cpgcn.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("tiny-data"), 8, size=96, seed=3, heterogeneity=0.5)


@pytest.fixture(scope="session")
def tiny_trained(tiny_data, tmp_path_factory):
    """One tiny pipeline run trained on :func:`tiny_data` for the whole session: ``(run, events)``.

    Tests must not modify it (copy it first); training it once instead of once per module keeps
    CI minutes and disk (checkpoints) down.
    """
    import torch

    from napari_cpgcn.pipeline import PipelineConfig, train_pipeline

    run = tmp_path_factory.mktemp("tiny-run") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # several times faster than 2 oversubscribed threads on a busy CI box
    try:
        events = list(train_pipeline(tiny_data / "images", tiny_data / "train.csv", run,
                                     PipelineConfig.tiny(image_size=64, epochs=1, device="cpu")))
    finally:
        torch.set_num_threads(n)
    return run, events

