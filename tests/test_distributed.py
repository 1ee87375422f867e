"""Scale-out: Dask-distributed folder prediction and torchrun (DDP) training.

Prediction runs on real ``LocalCluster`` s of worker *processes*: the outputs must equal a
serial run's, a worker process that dies on an image once must not cost that image, and an
image that kills every worker that touches it ends in ``failures.csv`` with the partial exit
code. Worker deaths are caused by a Dask worker preload script (test-only) that makes
``read_input`` call ``os._exit`` on chosen images: nothing in the library knows about it.

Training runs ``torchrun --nproc-per-node 2`` on tiny synthetic data and checks that rank 0
alone writes checkpoints and that both ranks end with identical weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import distributed  # noqa: E402,F401  (the distributed extra is part of the test install)
import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_cpgcn.batch import BatchOptions, run_predict_folder  # noqa: E402
from napari_cpgcn.batch.dask import (  # noqa
    ClusterError,
    ClusterSpec,
    default_torch_threads,
    jobqueue_kwargs,
    make_jobqueue_cluster,
    predict_folder_distributed,
)
from napari_cpgcn.cli import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, main  # noqa: E402
from napari_cpgcn.events import EventKind  # noqa

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = ("cells.csv", "images.csv", "failures.csv")


# ----------------------------------------------------------------------------- a shippable predictor

from _fake_predictor import ThresholdPredictor  # noqa: E402
from _fake_predictor import write_image as _write_image  # noqa: E402


@pytest.fixture
def folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    d = tmp_path / "images"
    for i in range(6):
        _write_image(d, f"img{i:02d}", rng)
    return d


def _outputs(out: Path, names=RUN_FILES) -> dict[str, bytes]:
    files = {n: (out / n).read_bytes() for n in names}
    for sub in ("masks", "cams"):
        for f in sorted((out / sub).glob("*.tif")):
            files[f"{sub}/{f.name}"] = tifffile.imread(f).tobytes()
    return files


def _kill_preload(tmp_path: Path, once: tuple[str, ...] = (), always: tuple[str, ...] = ()) -> Path:
    """A Dask worker preload that exits the worker process when it reads chosen images.

    ``once``: only the first time (a marker file remembers it across worker restarts);
    ``always``: every time (a poison image).
    """
    markers = tmp_path / "kill-markers"
    markers.mkdir(exist_ok=True)
    script = tmp_path / "kill_preload.py"
    script.write_text(textwrap.dedent(f"""
        import os
        from pathlib import Path

        ONCE = {list(once)!r}
        ALWAYS = {list(always)!r}
        MARKERS = Path({str(markers)!r})

        def dask_setup(worker):
            import napari_cpgcn.batch.local as batch

            original = batch.read_input

            def read_input(input_dir, image_id):
                if image_id in ALWAYS:
                    (MARKERS / f"{{image_id}}.{{os.getpid()}}").touch()
                    os._exit(17)
                if image_id in ONCE:
                    try:
                        (MARKERS / f"{{image_id}}.once").touch(exist_ok=False)
                    except FileExistsError:
                        pass
                    else:
                        os._exit(17)
                return original(input_dir, image_id)

            batch.read_input = read_input
    """))
    return script


@pytest.fixture
def kill_hook(tmp_path, monkeypatch):
    """Install the kill preload for worker processes started in this test."""
    import dask

    def install(once=(), always=()):
        script = _kill_preload(tmp_path, tuple(once), tuple(always))
        cm = dask.config.set({"distributed.worker.preload": [str(script)]})
        cm.__enter__()
        installed.append(cm)
        return tmp_path / "kill-markers"

    installed: list = []
    yield install
    for cm in installed:
        cm.__exit__(None, None, None)


# ----------------------------------------------------------------------------- specs

def test_cluster_specs_parse_and_reject():
    assert ClusterSpec.parse("local:3") == ClusterSpec("local", n_workers=3)
    assert ClusterSpec.parse("tcp://10.0.0.5:8786") == ClusterSpec("tcp", address="tcp://10.0.0.5:8786")
    assert ClusterSpec.parse("SLURM").kind == "slurm"
    for bad in ("local:0", "local:x", "tcp://nohost", "kubernetes", ""):
        with pytest.raises(ClusterError):
            ClusterSpec.parse(bad)
    assert default_torch_threads(2, cores=8) == 4
    assert default_torch_threads(16, cores=8) == 1


def test_jobqueue_config_builds_a_job_script():
    cfg = {"cores": 8, "memory": "32GB", "walltime": "02:00:00", "queue": "gpu", "account": "lab",
           "gpus": 1, "job_script_prologue": ["source ~/venv/bin/activate"]}
    kwargs, threads = jobqueue_kwargs("slurm", cfg)
    assert threads == 8 and "--gres=gpu:1" in kwargs["job_extra_directives"]
    cluster = make_jobqueue_cluster("slurm", cfg)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in ("#SBATCH -p gpu", "#SBATCH -A lab", "#SBATCH --gres=gpu:1", "#SBATCH -t 02:00:00",
                 "export OMP_NUM_THREADS=8", "cpgcn_predict=1", "source ~/venv/bin/activate"):
        assert line in script, line
    with pytest.raises(ClusterError, match="not understood"):
        jobqueue_kwargs("slurm", {"cores": 1, "memory": "1GB", "coress": 3})
    with pytest.raises(ClusterError, match="memory"):
        jobqueue_kwargs("lsf", {"cores": 1})


# ----------------------------------------------------------------------------- prediction

def test_local_cluster_equals_serial_and_resumes(folder, tmp_path):
    opts = BatchOptions(save_cams=True, submission=True)
    serial = tmp_path / "serial"
    s = run_predict_folder(folder, ThresholdPredictor(), serial, opts)
    assert (s.n_done, s.n_failed) == (6, 0)

    dist = tmp_path / "dist"
    events = list(predict_folder_distributed(folder, ThresholdPredictor(), dist, opts, cluster="local:2"))
    kinds = [e.kind for e in events]
    assert kinds[-1] == EventKind.DONE and kinds.count(EventKind.ITEM) == 6
    log_ev = next(e for e in events if e.kind == EventKind.LOG)
    assert "local:2" in log_ev.message and "2 workers" in log_ev.message
    summary = events[-1].result
    assert (summary.n_done, summary.n_skipped, summary.n_failed) == (6, 0, 0)
    assert set(summary.seconds_by_stage) >= {"read", "predict", "write"}
    names = (*RUN_FILES, "submission.csv")
    assert _outputs(dist, names) == _outputs(serial, names)
    assert not [p for p in dist.rglob("*") if p.name.endswith(".tmp")]

    # rerun: every image is finished, no cluster is started, the files stay the same
    again = list(predict_folder_distributed(folder, ThresholdPredictor(), dist, opts, cluster="local:2"))
    assert not [e for e in again if e.kind == EventKind.LOG]
    assert again[-1].result.n_skipped == 6 and again[-1].result.n_done == 0
    assert _outputs(dist, names) == _outputs(serial, names)


def test_worker_killed_once_still_finishes_every_image(folder, tmp_path, kill_hook):
    markers = kill_hook(once=["img02", "img04"])
    out = tmp_path / "out"
    summary = None
    for ev in predict_folder_distributed(folder, ThresholdPredictor(), out, BatchOptions(), cluster="local:2"):
        if ev.kind == EventKind.DONE:
            summary = ev.result
    assert (markers / "img02.once").exists() and (markers / "img04.once").exists()  # the workers did die
    assert (summary.n_done, summary.n_failed) == (6, 0)
    serial = tmp_path / "serial"
    run_predict_folder(folder, ThresholdPredictor(), serial, BatchOptions())
    assert _outputs(out) == _outputs(serial)


def test_poison_image_ends_in_failures_with_bounded_tries(folder, tmp_path, kill_hook):
    markers = kill_hook(always=["img03"])
    out = tmp_path / "out"
    summary = None
    for ev in predict_folder_distributed(folder, ThresholdPredictor(), out, BatchOptions(),
                                         cluster="local:2", max_tries=2):
        if ev.kind == EventKind.DONE:
            summary = ev.result
    assert len(list(markers.glob("img03.*"))) == 2  # tried exactly max_tries times
    assert (summary.n_done, summary.n_failed) == (5, 1)
    failures = pd.read_csv(out / "failures.csv")
    assert list(failures.image_id) == ["img03"]
    assert failures.stage[0] == "worker" and "WorkerKilled" in failures.error[0]
    assert sorted(pd.read_csv(out / "images.csv").image_id) == [f"img{i:02d}" for i in range(6) if i != 3]


def test_existing_scheduler_by_address(folder, tmp_path):
    """``tcp://HOST:PORT``: connect to a running scheduler (here an in-process one with thread workers)."""
    from distributed import LocalCluster

    serial = tmp_path / "serial"
    run_predict_folder(folder, ThresholdPredictor(), serial, BatchOptions())
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://",
                      dashboard_address=None) as cl:
        out = tmp_path / "out"
        events = list(predict_folder_distributed(folder, ThresholdPredictor(), out, BatchOptions(),
                                                 cluster=cl.scheduler_address))
        assert f"Dask cluster {cl.scheduler_address}: 2 workers" in events[1].message
        assert events[-1].result.n_done == 6
        assert len(cl.scheduler.workers) == 2  # the cluster is not ours: it is left running...
        assert not [n for n in cl.scheduler.worker_plugins if "napari-cpgcn" in n]  # ...without our predictor
    assert _outputs(out) == _outputs(serial)


def _fake_slurm(tmp_path: Path) -> Path:
    """``sbatch`` / ``squeue`` / ``scancel`` that run the job script on this machine (a one-node SLURM)."""
    bin_dir = tmp_path / "fake-slurm"
    bin_dir.mkdir()
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (bin_dir / "sbatch").write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        # copy the script (dask-jobqueue deletes it once sbatch returns), run it in its own session
        n=$(ls {jobs} | wc -l); job={jobs}/job$n.sh
        cp "$1" "$job"
        setsid bash "$job" > "$job.log" 2>&1 < /dev/null &
        echo "Submitted batch job $!"
        """))
    (bin_dir / "scancel").write_text("#!/usr/bin/env bash\nfor j in \"$@\"; do kill -TERM -- -$j 2>/dev/null; done\nexit 0\n")
    (bin_dir / "squeue").write_text("#!/usr/bin/env bash\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def test_slurm_cluster_runs_jobs_through_sbatch(folder, tmp_path, monkeypatch):
    """The ``slurm`` spec end to end: job scripts submitted with sbatch (here: run locally), adaptive workers."""
    import yaml

    bin_dir = _fake_slurm(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = tmp_path / "slurm.yaml"
    config.write_text(yaml.safe_dump({
        "cores": 1, "processes": 1, "memory": "2GB", "walltime": "00:10:00", "queue": "test",
        # workers must be able to import this test module (the shipped predictor's class)
        "job_script_prologue": [f"export PYTHONPATH={Path(__file__).parent}"],
        "log_directory": str(tmp_path / "dask-logs"),
    }))
    out = tmp_path / "out"
    events = list(predict_folder_distributed(folder, ThresholdPredictor(), out, BatchOptions(), cluster="slurm",
                                             cluster_config=config, max_workers=2))
    summary = events[-1].result
    assert (summary.n_done, summary.n_failed) == (6, 0)
    scripts = sorted((tmp_path / "jobs").glob("job*.sh"))
    assert 1 <= len(scripts) <= 2  # adaptive: at most --max-workers jobs
    text = scripts[0].read_text()
    assert "#SBATCH -p test" in text and "--resources cpgcn_predict=1" in text and "OMP_NUM_THREADS=1" in text
    serial = tmp_path / "serial"
    run_predict_folder(folder, ThresholdPredictor(), serial, BatchOptions())
    assert _outputs(out) == _outputs(serial)


def test_cli_usage_errors(folder, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "stages.json").write_text("{}")  # a pipeline run folder
    base = ["predict", str(folder), "--model", str(run), "--out", str(tmp_path / "o"), "-q"]
    assert main([*base, "--cluster", "kubernetes"]) == EXIT_USAGE
    assert main([*base, "--cluster", "slurm"]) == EXIT_USAGE  # no --cluster-config
    assert main([*base, "--cluster", "slurm", "--cluster-config", str(tmp_path / "none.yaml")]) == EXIT_USAGE


# ----------------------------------------------------------------------------- CLI, real trained model




@pytest.fixture(scope="module")
def tiny_run(tiny_trained, tiny_data) -> tuple[Path, Path]:
    """A tiny trained pipeline and a folder of synthetic images to predict."""
    return tiny_trained[0], tiny_data


@pytest.mark.slow
def test_cli_cluster_predict_equals_serial_and_poison_is_partial(tiny_run, tmp_path, kill_hook):
    from napari_cpgcn.io.hpa import list_image_ids, resolve_images_dir

    run, data = tiny_run
    ids = list_image_ids(resolve_images_dir(data))
    serial, dist = tmp_path / "serial", tmp_path / "dist"
    common = ["--model", str(run), "--device", "cpu", "-q"]
    assert main(["predict", str(data), "--out", str(serial), *common]) == EXIT_OK
    poison = ids[1]
    kill_hook(once=[ids[4]], always=[poison])
    code = main(["predict", str(data), "--out", str(dist), *common, "--cluster", "local:2", "--max-tries", "2"])
    assert code == EXIT_PARTIAL
    failures = pd.read_csv(dist / "failures.csv")
    assert list(failures.image_id) == [poison] and failures.stage[0] == "worker"
    # every other image equals the serial run's, row for row
    s_cells, d_cells = pd.read_csv(serial / "cells.csv"), pd.read_csv(dist / "cells.csv")
    pd.testing.assert_frame_equal(s_cells[s_cells.image_id != poison].reset_index(drop=True), d_cells)
    s_img = pd.read_csv(serial / "images.csv")
    pd.testing.assert_frame_equal(s_img[s_img.image_id != poison].reset_index(drop=True),
                                  pd.read_csv(dist / "images.csv"))
    for i in ids:
        if i != poison:
            assert (tifffile.imread(serial / "masks" / f"{i}.tif") == tifffile.imread(dist / "masks" / f"{i}.tif")).all()


def test_cli_segment_on_cluster_equals_serial(tiny_labelled, tmp_path):
    serial, dist = tmp_path / "serial", tmp_path / "dist"
    assert main(["segment", str(tiny_labelled), "--out", str(serial), "-q"]) == EXIT_OK
    assert main(["segment", str(tiny_labelled), "--out", str(dist), "-q", "--cluster", "local:2"]) == EXIT_OK
    names = sorted(f.name for f in serial.glob("*.tif"))
    assert names == sorted(f.name for f in dist.glob("*.tif")) and len(names) == 10
    for n in names:
        assert np.array_equal(tifffile.imread(serial / n), tifffile.imread(dist / n)), n
    assert main(["segment", str(tiny_labelled), "--out", str(dist), "-q", "--cluster", "bogus"]) == EXIT_USAGE


# ----------------------------------------------------------------------------- torchrun / DDP

_DDP_WRAPPER = '''
import os
import sys
from pathlib import Path

import torch

from napari_cpgcn.training import engine, image_trainer

rank = os.environ["RANK"]
record = Path(sys.argv[1])
original_save, original_fit = engine.save_checkpoint, image_trainer.fit


def save_checkpoint(path, *args, **kwargs):  # which rank writes which checkpoint
    with open(record / f"saves.rank{rank}.txt", "a") as fh:
        fh.write(Path(path).name + "\\n")
    return original_save(path, *args, **kwargs)


def fit(model, *args, **kwargs):  # each rank's weights once training is over
    yield from original_fit(model, *args, **kwargs)
    torch.save(model.state_dict(), record / f"weights.rank{rank}.pt")


engine.save_checkpoint = save_checkpoint
image_trainer.fit = fit

from napari_cpgcn.cli import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
'''


@pytest.fixture(scope="module")
def tiny_labelled(tmp_path_factory) -> Path:
    from napari_cpgcn.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("ddp-data"), 10, size=64, seed=7)


def _torchrun(tmp_path: Path, nproc: int, argv: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    record = tmp_path / "record"
    record.mkdir(exist_ok=True)
    wrapper = tmp_path / "ddp_wrapper.py"
    wrapper.write_text(_DDP_WRAPPER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(wrapper), str(record), *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def test_torchrun_two_processes_train_image(tiny_labelled, tmp_path):
    import torch

    run = tmp_path / "run"
    argv = ["train-image", str(tiny_labelled), "--labels", str(tiny_labelled / "train.csv"), "--out", str(run),
            "--backbone", "resnet18", "--epochs", "1", "--batch-size", "2", "--image-size", "64",
            "--device", "cpu", "--imagenet-weights", "none", "--val-fraction", "0.3"]
    proc = _torchrun(tmp_path, 2, argv)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    record = tmp_path / "record"
    # rank 0 alone writes the checkpoints
    assert (record / "saves.rank0.txt").read_text().split() == ["latest.pt", "best.pt"]
    assert not (record / "saves.rank1.txt").exists()
    assert (run / "latest.pt").is_file() and (run / "best.pt").is_file()
    # the ranks end with identical weights (and buffers), equal to the checkpoint's
    w0 = torch.load(record / "weights.rank0.pt", weights_only=True)
    w1 = torch.load(record / "weights.rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys() and not any(k.startswith("module.") for k in w0)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    ckpt = torch.load(run / "latest.pt", weights_only=True)
    for k in w0:
        assert torch.equal(ckpt["model"][k], w0[k]), k
    history = pd.read_csv(run / "history.csv")
    assert len(history) == 1 and np.isfinite(history.val_mAP[0]) and np.isfinite(history.train_loss[0])
    log_text = (run / "train-image.log").read_text()
    assert "rank 0 of 2" in log_text and "rank 1 of 2" not in log_text

    # resume under torchrun: a second epoch continues from latest.pt
    proc = _torchrun(tmp_path, 2, [*argv[:argv.index("--epochs")], "--epochs", "2", *argv[argv.index("--epochs") + 2:]])
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert len(pd.read_csv(run / "history.csv")) == 2


@pytest.mark.slow
def test_torchrun_whole_pipeline_console_script(tiny_labelled, tmp_path):
    """``torchrun --no-python napari-cpgcn train``: every stage, rank-0 records, resumable, predictable."""
    import json

    exe = Path(sys.executable).with_name("napari-cpgcn")
    if not exe.is_file():
        pytest.skip("the napari-cpgcn console script is not installed next to this python")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python",
           str(exe), "train", str(tiny_labelled), "--labels", str(tiny_labelled / "train.csv"), "--out", str(run),
           "--preset", "tiny", "--epochs", "1", "--image-size", "64", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    stages = json.loads((run / "stages.json").read_text())["finished"]
    assert list(stages) == ["image_model", "refine", "segmentation", "pseudolabels", "cell_model", "fusion"]
    assert len(list((run / "segmentation").glob("*.tif"))) == 10  # both ranks' slices
    log_text = (run / "train.log").read_text()
    assert "rank 0 of 2" in log_text and "rank 1 of 2" not in log_text
    # a rerun under torchrun skips every finished stage
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert proc.stderr.count("finished earlier") >= 5
    assert main(["predict", str(tiny_labelled), "--model", str(run), "--out", str(tmp_path / "pred"), "-q",
                 "--device", "cpu"]) == EXIT_OK
