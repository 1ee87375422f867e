"""HPA image and table I/O (no Qt, no torch)."""

from napari_cpgcn.io.hpa import (
    HPAImage,
    HPAImageError,
    find_channel_files,
    list_image_ids,
    read_image,
    read_multichannel_tiff,
    resolve_images_dir,
    to_float,
)
from napari_cpgcn.io.tables import LabelTable, read_labels_csv, write_labels_csv

__all__ = [
    "HPAImage",
    "HPAImageError",
    "LabelTable",
    "find_channel_files",
    "list_image_ids",
    "read_image",
    "read_labels_csv",
    "read_multichannel_tiff",
    "resolve_images_dir",
    "to_float",
    "write_labels_csv",
]
