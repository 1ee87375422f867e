"""Folder prediction: what it writes (:mod:`~napari_cpgcn.batch.outputs`), the in-process streaming
engine (:mod:`~napari_cpgcn.batch.local`) and the Dask one (:mod:`~napari_cpgcn.batch.dask`, an
optional extra, not imported here).

The names below are imported on first use (PEP 562), so importing a light submodule such as
``batch.config`` does not pull in the heavy ones.
"""


from __future__ import annotations

from typing import TYPE_CHECKING

from napari_cpgcn._lazy import lazy_names

#: public name -> submodule that defines it
_WHERE: dict[str, str] = {
    "predict_folder": "local",
    "process_image": "local",
    "run_predict_folder": "local",
    "CELL_COLUMNS": "outputs",
    "FAILURE_COLUMNS": "outputs",
    "IMAGE_COLUMNS": "outputs",
    "BatchConfigError": "outputs",
    "BatchOptions": "outputs",
    "BatchSummary": "outputs",
    "ImageRecord": "outputs",
    "assemble_outputs": "outputs",
    "image_paths": "outputs",
    "is_done": "outputs",
    "top_classes": "outputs",
    "write_image_outputs": "outputs",
}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = lazy_names(__name__, _WHERE)

if TYPE_CHECKING:  # pragma: no cover
    from napari_cpgcn.batch.local import predict_folder, process_image, run_predict_folder  # noqa: F401
    from napari_cpgcn.batch.outputs import (  # noqa: F401
        CELL_COLUMNS,
        FAILURE_COLUMNS,
        IMAGE_COLUMNS,
        BatchConfigError,
        BatchOptions,
        BatchSummary,
        ImageRecord,
        assemble_outputs,
        image_paths,
        is_done,
        top_classes,
        write_image_outputs,
    )
