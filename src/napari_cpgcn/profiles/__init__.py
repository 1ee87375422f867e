"""Per-cell profiles for analysis: embeddings as AnnData (:mod:`.embeddings`) and the
single-cell variation score per image and class (:mod:`.variation`).

No Qt; torch only where cell features are computed, anndata / umap-learn only when the
``cells.h5ad`` is assembled.
"""
