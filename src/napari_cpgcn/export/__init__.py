"""Model exports for other tools: bioimage.io model packages (:mod:`napari_cpgcn.export.bioimageio`).

Nothing is imported here: the exporters need optional packages (``pip install
napari-cpgcn[bioimageio]``) and torch, which a core install must not pull in at import.
"""
