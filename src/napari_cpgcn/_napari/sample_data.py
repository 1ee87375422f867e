"""napari sample data: synthetic HPA-like images (a real HPA image cannot be packaged).

Thin adapters over :func:`napari_cpgcn.synth.synth_sample` and :mod:`napari_cpgcn._napari.layers`:
four channel layers (red, green, blue, yellow; additive blending) and the true cells.
"""

from __future__ import annotations

from typing import Any

from napari_cpgcn.classes import CLASSES

__all__ = ["make_synthetic_sample", "make_synthetic_sample_heterogeneous", "synth_layer_data"]

LayerDataTuple = tuple[Any, dict[str, Any], str]

TRUTH_LAYER = "cells (truth)"


def synth_layer_data(seed: int = 0, size: int = 512, heterogeneity: float = 0.5,
                     with_truth: bool = True, labels: list[int] | None = None) -> list[LayerDataTuple]:
    """Layer data tuples of one synthetic image: 4 channel layers (+ the truth cells)."""
    from napari_cpgcn._napari.layers import cells_layer, channel_layers
    from napari_cpgcn.io.hpa import HPAImage
    from napari_cpgcn.synth import synth_sample

    im = synth_sample(seed=seed, size=size, heterogeneity=heterogeneity, labels=labels)
    image_labels = [int(k) for k, v in enumerate(im.image_labels) if v]
    hpa = HPAImage(data=im.data, image_id=im.image_id, paths={},
                   bit_depth=8, source_format="synthetic")
    layers = channel_layers(hpa, labels=image_labels)
    for _, kwargs, _ in layers:
        kwargs["metadata"]["synthetic"] = True
    if with_truth:
        data, kwargs, kind = cells_layer(im.cells, image_id=im.image_id, name=TRUTH_LAYER)
        cell_sets = im.cell_label_sets()
        kwargs["metadata"].update({
            "synthetic": True,
            "truth": True,
            "cell_labels": {int(c): sorted(v) for c, v in cell_sets.items()},
            "image_labels": image_labels,
        })
        import pandas as pd

        kwargs["features"] = pd.DataFrame({
            "index": list(cell_sets),
            "labels": ["|".join(str(k) for k in sorted(v)) for v in cell_sets.values()],
            "label_names": [", ".join(CLASSES[k].name for k in sorted(v)) for v in cell_sets.values()],
            "mitotic": im.mitotic.tolist(),
        })
        layers.append((data, kwargs, kind))
    return layers


def make_synthetic_sample() -> list[LayerDataTuple]:
    """napari sample: a synthetic HPA image (seed 0, 512²) with its true cells."""
    return synth_layer_data(seed=0, size=512, heterogeneity=0.5)


def make_synthetic_sample_heterogeneous() -> list[LayerDataTuple]:
    """napari sample: a strongly heterogeneous synthetic image (few cells express the protein)."""
    return synth_layer_data(seed=7, size=512, heterogeneity=1.0, labels=[0, 14])
