"""napari-cpgcn: single-cell protein localisation in HPA images with CP-GCN.

The core (``io``, ``segmentation``, ``models``, ``training``, ``pipeline``, ``evaluation``)
imports no Qt and no napari; widgets live in ``napari_cpgcn._napari.widgets``. Heavy libraries
(torch) load only when a function that needs them runs.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
