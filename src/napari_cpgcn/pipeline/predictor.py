"""Prediction with a trained run: the one :class:`Predictor` used by the GUI, the CLI, folder runs and Dask.

:class:`CPGCNPredictor` loads the image model (the refined one when present) and the cell model
once; :meth:`~CPGCNPredictor.predict` segments an image (or takes given cells), predicts image-level
probabilities and CAMs, classifies every cell crop and fuses ``C_final = C_image x C_cell``
(METHOD.md step 6), returning a :class:`CellPrediction` whose ``table`` has the shared per-cell
columns (:mod:`napari_cpgcn.io.celltable`). :meth:`~CPGCNPredictor.iter_predict` is the same as a
generator that yields a message before each stage, so a GUI can show progress and stop between
stages.

No Qt; torch is imported when a predictor is loaded.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from napari_cpgcn.classes import N_CLASSES, SHORT_NAMES
from napari_cpgcn.io.hpa import HPAImage
from napari_cpgcn.pipeline.config import PipelineConfig

__all__ = [
    "fuse",
    "CellPrediction",
    "Predictor",
    "CPGCNPredictor",
    "iter_predict",
    "predict",
    "load_predictor",
    "resolve_model_path",
    "model_fingerprint",
    "segmentation_of",
]

log = logging.getLogger(__name__)

def fuse(image_probs: np.ndarray, cell_probs: np.ndarray) -> np.ndarray:
    """C_final(cell, class) = C_image(class) × C_cell(cell, class): (19,) × (n, 19) → (n, 19)."""
    return np.asarray(cell_probs, dtype=np.float32) * np.asarray(image_probs, dtype=np.float32)[None, :]


@dataclass
class CellPrediction:
    """Everything predicted for one image.

    Attributes
    ----------
    image_id : str
    image_probs : numpy.ndarray
        (19,) image-level probabilities.
    cams : numpy.ndarray or None
        (19, Y, X) float32 class maps at image size, each scaled to ``[0, p_c]`` by its class's
        image-level probability (None when not asked for).
    cells : numpy.ndarray
        (Y, X) uint32 cell label image.
    table : pandas.DataFrame
        One row per cell: geometry, ``top_class``, ``image_S``, ``cell_S``, ``fused_S``, ``unc_S``
        (uncertainty of the (cell, class) decision, in [0, 1]) and ``uncertainty`` (the cell's
        largest ``unc_S``).
    """

    image_id: str
    image_probs: np.ndarray
    cams: np.ndarray | None
    cells: np.ndarray
    table: pd.DataFrame
    #: Seconds per stage (``segment``, ``image_model``, ``cell_model``) when the predictor timed them.
    timings: dict[str, float] = field(default_factory=dict)
    #: Quality control of the segmentation (:func:`napari_cpgcn.segmentation.qc.mask_qc` with the
    #: nuclei) when the predictor segmented; empty for given cells.
    qc: dict[str, Any] = field(default_factory=dict)
    #: (n, D) float32 pooled cell-model features, one row per table row (only when the predictor
    #: was asked for them: ``with_embeddings=True``); see :mod:`napari_cpgcn.profiles.embeddings`.
    embeddings: np.ndarray | None = None
    #: (n,) float32 mean green (protein) intensity in [0, 1] of each table row's cell; used by the
    #: single-cell variation score (:mod:`napari_cpgcn.profiles.variation`).
    green_mean: np.ndarray | None = None

    @property
    def cell_probs(self) -> np.ndarray:
        return self.table[[f"cell_{s}" for s in SHORT_NAMES]].to_numpy(np.float32)

    @property
    def fused_probs(self) -> np.ndarray:
        return self.table[[f"fused_{s}" for s in SHORT_NAMES]].to_numpy(np.float32)

    @classmethod
    def from_parts(cls, image_id: str, cells: np.ndarray, image_probs: np.ndarray, cell_probs: np.ndarray,
                   cams: np.ndarray | None = None, geometry: pd.DataFrame | None = None,
                   fusion=None, cell_spread: np.ndarray | None = None) -> CellPrediction:
        """Assemble a prediction from its parts: the per-cell table (geometry, ``top_class``, image,
        cell, fused and uncertainty columns) is built here, the one place that does it. ``fusion``
        is a :class:`~napari_cpgcn.pipeline.fusion.FusionParams` (None: the paper's product).
        ``cell_spread`` is an (n, 19) spread in [0, 1] that raises the uncertainty above the
        fused probabilities' entropy (:func:`~napari_cpgcn.pipeline.uncertainty.combine`); None:
        the image/cell disagreement ``|p_image - p_cell|`` (the measured default), or the cell
        model's test-time-augmentation spread when the predictor was asked for it."""
        from napari_cpgcn.io.celltable import cell_geometry
        from napari_cpgcn.pipeline.uncertainty import cell_uncertainty, combine, disagreement

        cells = np.asarray(cells).astype(np.uint32, copy=False)
        geo = geometry if geometry is not None else cell_geometry(cells, image_id)
        image_probs = np.asarray(image_probs, np.float32).reshape(N_CLASSES)
        n = len(geo)
        cell_probs = np.asarray(cell_probs, np.float32).reshape(n, N_CLASSES)
        if fusion is None or fusion.method == "product":
            fused = fuse(image_probs, cell_probs)
        else:
            from napari_cpgcn.pipeline import fusion as fusions

            fused = np.asarray(fusions.fuse(image_probs, cell_probs, params=fusion), np.float32).reshape(n, N_CLASSES)
        spread = (disagreement(image_probs, cell_probs) if cell_spread is None
                  else np.asarray(cell_spread, np.float32).reshape(n, N_CLASSES))
        unc = combine(fused, spread)
        cols: dict[str, Any] = {"top_class": [SHORT_NAMES[int(k)] for k in fused.argmax(1)] if n else []}
        for prefix, arr in (("image_", np.repeat(image_probs[None], n, 0)), ("cell_", cell_probs),
                            ("fused_", fused), ("unc_", unc)):
            for k, s in enumerate(SHORT_NAMES):
                cols[f"{prefix}{s}"] = arr[:, k]
        cols["uncertainty"] = cell_uncertainty(unc)
        table = pd.concat([geo.reset_index(drop=True), pd.DataFrame(cols, index=range(n))], axis=1)
        return cls(image_id, image_probs, cams, cells, table)


@runtime_checkable
class Predictor(Protocol):
    """What every caller of prediction relies on: the GUI, the CLI, folder runs, Dask tasks, and
    the test fakes. :class:`CPGCNPredictor` (a trained run) is the implementation.

    ``segmentation=None`` always means "the method (and parameters) the run was trained with";
    a fake without a run uses its own.
    """

    #: The run folder the predictor was loaded from (None for objects not loaded from a run).
    run_dir: Path | None

    def predict(self, image: HPAImage, cells: np.ndarray | None = None, segmentation: str | None = None,
                with_cams: bool = True) -> CellPrediction:
        """Predict one image (segmenting it unless ``cells`` is given)."""
        ...


def iter_predict(predictor: Predictor, image: HPAImage, cells: np.ndarray | None = None,
                 segmentation: str | None = None, with_cams: bool = True
                 ) -> Generator[str, None, CellPrediction]:
    """``predictor.iter_predict`` when it has one (stoppable between stages), else its ``predict``
    as one stage: the generator form every GUI caller uses."""
    steps = getattr(predictor, "iter_predict", None)
    if steps is not None:
        return (yield from steps(image, cells, segmentation, with_cams))
    yield "predicting"
    return predictor.predict(image, cells=cells, segmentation=segmentation, with_cams=with_cams)


class CPGCNPredictor:
    """A trained pipeline ready to predict: the image model and the cell model, loaded once.

    Use :meth:`from_run` (or :func:`load_predictor`, which caches); then :meth:`predict` per
    image. Implements :class:`Predictor`. Thread-compatible (one predict at a time per
    predictor).
    """

    def __init__(self, image_model, image_config, cell_model, cell_config, device, *,
                 run_dir: str | Path | None = None, config: PipelineConfig | None = None,
                 fusion=None, uncertainty: str = "disagreement") -> None:
        self.image_model = image_model
        self.image_config = image_config
        self.cell_model = cell_model
        self.cell_config = cell_config
        self.device = device
        self.run_dir = Path(run_dir) if run_dir else None
        self.config = config
        #: How the fused scores are made (the run's ``fusion.json``; None: the paper's product).
        self.fusion = fusion
        #: How ``unc_S`` is made (:data:`~napari_cpgcn.pipeline.uncertainty.UNCERTAINTY_METHODS`):
        #: ``"disagreement"`` (default: no extra pass, ranked wrong decisions as well as the
        #: others on the synthetic benchmark), ``"tta"`` (4 cell-model passes per crop) or
        #: ``"entropy"`` (the fused probability's entropy alone).
        from napari_cpgcn.pipeline.uncertainty import UNCERTAINTY_METHODS

        if uncertainty not in UNCERTAINTY_METHODS:
            raise ValueError(f"uncertainty must be one of {UNCERTAINTY_METHODS}, got {uncertainty!r}")
        self.uncertainty = uncertainty

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", *, image_checkpoint: str | Path | None = None,
                 cell_checkpoint: str | Path | None = None) -> CPGCNPredictor:
        """Load a trained run folder: its refined image model (else ``image_model/best.pt``) and its
        cell model, or the given checkpoints of the run instead.

        Raises
        ------
        FileNotFoundError
            When the folder holds no trained image or cell model (the message says which).
        napari_cpgcn.training.checkpoint.CheckpointError
            A checkpoint that is corrupt, foreign, or made for another class set.
        """
        from napari_cpgcn.training.checkpoint import load_cell_model, load_image_model

        run = Path(run_dir)
        if not run.is_dir():
            raise FileNotFoundError(f"run folder {run} does not exist; train with `napari-cpgcn train` first")
        image_model, icfg = load_image_model(image_checkpoint or run, device)
        cell_model, ccfg, dev = load_cell_model(cell_checkpoint or run, device)
        config = PipelineConfig.load(run / "config.json") if (run / "config.json").is_file() else None
        if list(ccfg.classes) != list(icfg.classes):
            raise ValueError(f"{run}: the image and cell models were trained on different classes")
        fusion = None
        if (run / "fusion.json").is_file():
            from napari_cpgcn.pipeline.fusion import FusionParams

            fusion = FusionParams.load(run / "fusion.json")
        return cls(image_model, icfg, cell_model, ccfg, dev, run_dir=run, config=config, fusion=fusion)

    @property
    def segmentation(self) -> str:
        return self.config.segmentation if self.config else "classical"

    def segment(self, data: np.ndarray, method: str, **params: Any):
        """Cells of one (4, Y, X) image with their quality control
        (:func:`napari_cpgcn.segmentation.segment_cells_with_qc`; a plain label image also works)."""
        from napari_cpgcn.segmentation import segment_cells_with_qc

        return segment_cells_with_qc(data, method=method, **params)

    def predict_image(self, data: np.ndarray, with_cams: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Image-level probabilities (19,) and CAMs (19, Y, X) at image size (or None).

        Each class map is scaled to the class's probability (its maximum is ``p_c``), so the
        map of a class the model does not see in the image is dark, not as bright as the top
        class's: a CAM value reads as "probability here".
        """
        from napari_cpgcn.pipeline.inference import predict_images

        method = self.config.cam_method if self.config else "model"
        probs, cams = predict_images(self.image_model, [data], batch_size=1, device=self.device,
                                     cam_method=method if with_cams else "model",
                                     cam_size="image" if with_cams else None)
        if not with_cams:
            return probs[0], None
        maps = np.asarray(cams[0], np.float32)
        maps *= np.asarray(probs[0], np.float32)[:, None, None]
        return probs[0], maps

    def predict_cells(self, data: np.ndarray, cells: np.ndarray, geometry: pd.DataFrame,
                      batch_size: int = 64, *, with_embeddings: bool = False
                      ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Cell-model probabilities (n, 19) for the cells of ``geometry`` (crops cut batch by batch).

        With ``with_embeddings`` also the pooled features (n, D) of the same forward pass:
        ``(probs, features)``.
        """
        if not with_embeddings:
            return self.predict_cells_tta(data, cells, geometry, batch_size, views=("id",))[0]
        from napari_cpgcn.models.cell import crop_cells
        from napari_cpgcn.profiles.embeddings import predict_crops_with_features

        c = self.cell_config
        out, feats = [], []
        for i in range(0, len(geometry), batch_size):
            crops = crop_cells(data, cells, geometry.iloc[i:i + batch_size], size=c.crop_size,
                               zero_background=c.zero_background, pad=c.crop_pad)
            p, f = predict_crops_with_features(self.cell_model, crops, self.device, batch_size)
            out.append(p)
            feats.append(f)
        dim = int(self.cell_model.backbone.out_channels)
        if not out:
            return np.zeros((0, N_CLASSES), np.float32), np.zeros((0, dim), np.float32)
        return np.concatenate(out), np.concatenate(feats)

    def predict_cells_tta(self, data: np.ndarray, cells: np.ndarray, geometry: pd.DataFrame,
                          batch_size: int = 64, views: tuple[str, ...] | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
        """Cell-model probabilities (n, 19) of the plain crops and their test-time-augmentation
        spread (n, 19) in [0, 1] over ``views`` (default
        :data:`~napari_cpgcn.pipeline.uncertainty.TTA_VIEWS`; the first view must be ``"id"``)."""
        from napari_cpgcn.models.cell import crop_cells
        from napari_cpgcn.pipeline.uncertainty import TTA_VIEWS, tta_cell_probs, tta_uncertainty

        views = tuple(views or TTA_VIEWS)
        if views[0] != "id":
            raise ValueError(f"the first test-time view must be 'id' (the plain crops), got {views}")
        c = self.cell_config
        probs, spread = [], []
        for i in range(0, len(geometry), batch_size):
            crops = crop_cells(data, cells, geometry.iloc[i:i + batch_size], size=c.crop_size,
                               zero_background=c.zero_background, pad=c.crop_pad)
            v = tta_cell_probs(self.cell_model, crops, self.device, batch_size, views)
            probs.append(v[0])
            spread.append(tta_uncertainty(v) if len(views) > 1 else np.zeros_like(v[0]))
        if not probs:
            empty = np.zeros((0, N_CLASSES), np.float32)
            return empty, empty.copy()
        return np.concatenate(probs), np.concatenate(spread)

    def predict(
        self,
        image: HPAImage | np.ndarray,
        cells: np.ndarray | None = None,
        segmentation: str | None = None,
        with_cams: bool = True,
        *,
        image_id: str | None = None,
        segmentation_params: Mapping[str, Any] | None = None,
        with_embeddings: bool = False,
    ) -> CellPrediction:
        """Predict one image.

        Parameters
        ----------
        image
            An :class:`HPAImage` or a (4, Y, X) array (red, green, blue, yellow).
        cells
            A (Y, X) cell label image to use instead of segmenting.
        segmentation
            Method for :func:`napari_cpgcn.segmentation.segment_cells` when ``cells`` is None
            (None: the method the run was trained with).
        with_cams
            Also return the (19, Y, X) class maps.
        image_id
            Id written into the table (default: the HPAImage's id, else ``"image"``).
        segmentation_params
            Extra keyword arguments of the segmentation.
        with_embeddings
            Also return the cell model's pooled features per cell (``CellPrediction.embeddings``);
            off by default (the features cost memory, not time: same forward pass).
        """
        steps = self.iter_predict(image, cells, segmentation, with_cams, image_id=image_id,
                                  segmentation_params=segmentation_params, with_embeddings=with_embeddings)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def iter_predict(
        self,
        image: HPAImage | np.ndarray,
        cells: np.ndarray | None = None,
        segmentation: str | None = None,
        with_cams: bool = True,
        *,
        image_id: str | None = None,
        segmentation_params: Mapping[str, Any] | None = None,
        with_embeddings: bool = False,
    ) -> Generator[str, None, CellPrediction]:
        """:meth:`predict` as a generator that can be stopped between stages.

        Yields a short message (``"segmenting cells (classical)"``, ``"image model + CAMs"``,
        ``"cell model (n cells)"``, ``"per-cell table"``) just before each stage starts and
        returns the :class:`CellPrediction` (``StopIteration.value``; ``yield from`` gives it).
        Stopping the iteration (not calling ``next`` again, ``close()``, or a napari
        ``GeneratorWorker.quit()``) ends the prediction at the next stage boundary: the running
        stage finishes, nothing after it runs, and nothing is written anywhere. The arguments
        are those of :meth:`predict`; a wrong image shape raises before the first message.
        """
        if isinstance(image, HPAImage):
            data, iid = image.data, image_id or image.image_id
        else:
            data, iid = np.asarray(image), image_id or "image"
        if data.ndim != 3 or data.shape[0] != 4:
            raise ValueError(f"expected a (4, Y, X) image (red, green, blue, yellow), got shape {data.shape}")
        timings: dict[str, float] = {}
        qc: dict[str, Any] = {}
        if cells is None:
            method = segmentation or self.segmentation
            params = dict(segmentation_params or (self.config.segmentation_params if self.config
                                                  and method == self.config.segmentation else {}))
            yield f"segmenting cells ({method})"
            t0 = time.perf_counter()
            seg = self.segment(data, method, **params)
            cells, qc = (seg.cells, seg.qc) if hasattr(seg, "qc") else (seg, {})
            timings["segment"] = time.perf_counter() - t0
        cells = np.asarray(cells)
        if cells.shape != data.shape[1:]:
            raise ValueError(f"cell mask shape {cells.shape} does not match the image {data.shape[1:]}")
        cells = cells.astype(np.uint32, copy=False)
        from napari_cpgcn.io.celltable import cell_geometry

        yield "image model + CAMs" if with_cams else "image model"
        t0 = time.perf_counter()
        image_probs, cams = self.predict_image(data, with_cams)
        timings["image_model"] = time.perf_counter() - t0
        geo = cell_geometry(cells, iid)
        yield f"cell model ({len(geo)} cells)"
        t0 = time.perf_counter()
        embeddings = None
        cell_probs = None
        if with_embeddings:
            cell_probs, embeddings = self.predict_cells(data, cells, geo, with_embeddings=True)
        if self.uncertainty == "tta":  # the plain view again, with the augmented ones
            cell_probs, spread = self.predict_cells_tta(data, cells, geo)
        else:
            if cell_probs is None:
                cell_probs = self.predict_cells(data, cells, geo)
            spread = np.zeros_like(cell_probs) if self.uncertainty == "entropy" else None
        timings["cell_model"] = time.perf_counter() - t0
        yield "per-cell table"
        pred = CellPrediction.from_parts(iid, cells, image_probs, cell_probs, cams, geo, fusion=self.fusion,
                                         cell_spread=spread)
        pred.timings, pred.qc, pred.embeddings = timings, qc, embeddings
        from napari_cpgcn.profiles.variation import cell_green_means

        pred.green_mean = cell_green_means(data, cells, geo["cell_id"].to_numpy())
        return pred


def predict(image: HPAImage | np.ndarray, run_dir: str | Path, device: str = "auto", **kwargs: Any) -> CellPrediction:
    """One-shot prediction (:func:`load_predictor` caches the run, so repeated calls load it once)."""
    return load_predictor(run_dir, device=device).predict(image, **kwargs)


def _is_pipeline_run(folder: Path) -> bool:
    return (folder / "config.json").is_file() and ((folder / "stages.json").is_file()
                                                   or (folder / "cell_model").is_dir())


def resolve_model_path(model: str | Path) -> Path:
    """The pipeline run folder of ``model``: a run folder, or a checkpoint / file inside one.

    A run folder holds ``config.json`` and ``stages.json`` / ``cell_model/`` (what
    ``napari-cpgcn train`` writes); its ``image_model/`` and ``refine/`` sub-folders have a
    ``config.json`` of their own, so a checkpoint inside them resolves to the run above.

    Raises
    ------
    FileNotFoundError
        When the path does not exist or is not inside a trained pipeline run; a
        ``train-image`` folder (an image model without a cell model) is named as such.
    """
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {path} does not exist; give a trained run folder (made by `napari-cpgcn train` "
            "or `napari-cpgcn demo`) or a checkpoint inside one"
        )
    start = path if path.is_dir() else path.parent
    candidates = [start, *list(start.parents)[:3]]
    for c in candidates:
        if _is_pipeline_run(c):
            return c.resolve()
    image_only = next((c for c in candidates if (c / "config.json").is_file()), None)
    if image_only is not None:
        raise FileNotFoundError(
            f"{image_only} holds an image model only (made by `napari-cpgcn train-image`): per-cell "
            "prediction needs a pipeline run with a cell model. Train one with `napari-cpgcn train` "
            f"(it can start from this model: --init-from {image_only}).")
    raise FileNotFoundError(
        f"{path} is not a trained run: no config.json in it or its parent folders. Give the run "
        "folder written by `napari-cpgcn train OUT` (it holds config.json, image_model/, cell_model/)."
    )


def segmentation_of(model: str | Path | Predictor) -> tuple[str | None, dict[str, Any]]:
    """The segmentation method and parameters ``model`` uses when none is asked for: the run's
    (from its ``config.json``, without loading any weights), or ``(None, {})`` for a predictor
    that segments its own way."""
    if isinstance(model, (str, Path)):
        run = resolve_model_path(model)
        config = PipelineConfig.load(run / "config.json")
        return config.segmentation, dict(config.segmentation_params)
    config = getattr(model, "config", None)
    if config is not None:
        return config.segmentation, dict(config.segmentation_params)
    return getattr(model, "segmentation", None), {}


def _checkpoint_role(path: Path) -> str:
    """``"image_model"`` or ``"cell_model"``: which model of a run a ``.pt`` file holds."""
    from napari_cpgcn.training.checkpoint import CheckpointError, load_checkpoint

    meta = load_checkpoint(path, "cpu").get("meta", {})
    if meta.get("model") == "cpgcn-image":
        return "image_model"
    if meta.get("kind") == "cell_classifier":
        return "cell_model"
    raise CheckpointError(f"{path} holds neither an image model nor a cell model of napari-cpgcn")


def _model_source(model: str | Path) -> tuple[Path, dict[str, str]]:
    """The run folder of ``model`` and, when ``model`` is a checkpoint file, which of the run's
    models it replaces (``{"image_checkpoint": path}`` or ``{"cell_checkpoint": path}``)."""
    run = resolve_model_path(model)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".pt":
        role = _checkpoint_role(path)
        return run, {"image_checkpoint" if role == "image_model" else "cell_checkpoint": str(path.resolve())}
    return run, {}


def model_fingerprint(model: str | Path | Any) -> str:
    """A short hash identifying a model: its run folder, the checkpoint chosen inside it and the
    size / mtime of its checkpoints.

    Used to refuse resuming into an output folder made with another model, and as the key of
    the per-process predictor cache.
    """
    if not isinstance(model, (str, Path)):
        run_dir = getattr(model, "run_dir", None)
        if run_dir is None:
            return f"object:{type(model).__module__}.{type(model).__qualname__}"
        model = run_dir
    run = resolve_model_path(model)
    path = Path(model).expanduser()
    h = hashlib.sha1(str(run).encode())
    if path.is_file():
        h.update(str(path.resolve()).encode())
    # Weights (size + mtime) and the run's config (content: resuming a training rewrites it
    # unchanged) only: files a predictor might write (caches, logs) must not change the
    # fingerprint, or resuming would be refused.
    for f in sorted(run.rglob("*")):
        if f.suffix in (".pt", ".pth", ".safetensors") and f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(run)}:{st.st_size}:{st.st_mtime_ns}".encode())
        elif f.name in ("config.json", "fusion.json") and f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


_PREDICTOR_LOCK = threading.Lock()
_PREDICTOR_CACHE: dict[tuple[str, str, str], CPGCNPredictor] = {}


def load_predictor(model: str | Path | Predictor, device: str = "auto") -> Predictor:
    """The predictor of ``model``, loaded once per process and cached.

    ``model`` may be a run folder, a checkpoint inside one (an image-model checkpoint replaces
    the run's image model, a cell-model checkpoint its cell model), or an already loaded
    :class:`Predictor`, which is returned as is. The cache keeps one predictor (keyed by run
    folder, checkpoint fingerprint and device), so a Dask worker or a GUI session that predicts
    many folders loads the weights once.
    """
    if not isinstance(model, (str, Path)):
        if not isinstance(model, Predictor):
            raise TypeError(f"model must be a run folder or a predictor, got {type(model).__name__}")
        return model
    key = (str(Path(model).expanduser().resolve()), model_fingerprint(model), str(device))
    with _PREDICTOR_LOCK:
        if key not in _PREDICTOR_CACHE:
            run, chosen = _model_source(model)
            _PREDICTOR_CACHE.clear()
            log.info("loading model %s on device %s", run, device)
            _PREDICTOR_CACHE[key] = CPGCNPredictor.from_run(run, device=device, **chosen)
        return _PREDICTOR_CACHE[key]
