"""The trained pipeline: its settings, its training, and the one way to predict with it.

* :mod:`~napari_cpgcn.pipeline.config` — :class:`PipelineConfig` (every setting, saved as
  ``RUN/config.json``);
* :mod:`~napari_cpgcn.pipeline.train` — :func:`train_pipeline`, the five resumable stages;
* :mod:`~napari_cpgcn.pipeline.predictor` — :class:`Predictor` (the protocol every caller uses:
  GUI, CLI, folder runs, Dask), :class:`CPGCNPredictor` (the trained run), :func:`load_predictor`;
* :mod:`~napari_cpgcn.pipeline.inference` — batched image / cell-crop inference and CAMs.

The names below are imported on first use (PEP 562), so importing a light submodule such as
``pipeline.config`` does not pull in the heavy ones.
"""


from __future__ import annotations

from typing import TYPE_CHECKING

from napari_cpgcn._lazy import lazy_names

#: public name -> submodule that defines it
_WHERE: dict[str, str] = {
    "STAGES": "config",
    "PRESETS": "config",
    "PipelineConfig": "config",
    "CellPrediction": "predictor",
    "Predictor": "predictor",
    "CPGCNPredictor": "predictor",
    "fuse": "predictor",
    "iter_predict": "predictor",
    "load_predictor": "predictor",
    "model_fingerprint": "predictor",
    "predict": "predictor",
    "resolve_model_path": "predictor",
    "segmentation_of": "predictor",
    "RunSettingsChanged": "train",
    "changed_settings": "train",
    "check_settings": "train",
    "finished_stages": "train",
    "train_pipeline": "train",
}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = lazy_names(__name__, _WHERE)

if TYPE_CHECKING:  # pragma: no cover
    from napari_cpgcn.pipeline.config import PRESETS, STAGES, PipelineConfig  # noqa: F401
    from napari_cpgcn.pipeline.predictor import (  # noqa: F401
        CellPrediction,
        CPGCNPredictor,
        Predictor,
        fuse,
        iter_predict,
        load_predictor,
        model_fingerprint,
        predict,
        resolve_model_path,
        segmentation_of,
    )
    from napari_cpgcn.pipeline.train import (  # noqa: F401
        RunSettingsChanged,
        changed_settings,
        check_settings,
        finished_stages,
        train_pipeline,
    )
