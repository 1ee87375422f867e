"""Read HPA four-channel images (red, green, blue, yellow) from the formats users have.

Supported layouts
-----------------
* Kaggle 2021 / 2018: ``{ID}_{color}.png`` (8- or 16-bit grey PNG per channel);
* HPA archive: ``{plate}_{well}_{field}_{color}.jpg|tif|tif.gz`` where JPEG channels are
  often stored as RGB colour images (the signal sits in the channel's colour planes);
* one multi-channel TIFF / OME-TIFF holding (C, Y, X), with the channel order taken from
  the OME channel names or given explicitly.

Every image comes back as :class:`HPAImage` with ``data`` of shape (4, Y, X) in the fixed
order :data:`napari_cpgcn.classes.CHANNELS`, in its native dtype (uint8 or uint16).
"""

from __future__ import annotations

import gzip
import io as _io
import logging
import os
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_cpgcn.classes import CHANNELS

__all__ = [
    "HPAImage",
    "ImageIndex",
    "image_index",
    "folder_image_ids",
    "NoImagesError",
    "HPAImageError",
    "CHANNEL_FILE_RE",
    "parse_channel_filename",
    "find_channel_files",
    "list_image_ids",
    "resolve_images_dir",
    "read_image",
    "read_channel_set",
    "read_multichannel_tiff",
    "to_float",
]

log = logging.getLogger(__name__)

CHANNEL_EXTENSIONS = ("png", "jpg", "jpeg", "tif", "tiff", "tif.gz", "tiff.gz")
#: ``{ID}_{color}.{ext}``; the id is everything before the last ``_color``.
CHANNEL_FILE_RE = re.compile(
    r"^(?P<id>.+)_(?P<color>red|green|blue|yellow)\.(?P<ext>png|jpe?g|tiff?(?:\.gz)?)$",
    re.IGNORECASE,
)
TIFF_RE = re.compile(r"\.(ome\.)?tiff?$", re.IGNORECASE)

# Which planes of an RGB-stored channel hold its signal.
_COLOR_PLANES = {"red": (0,), "green": (1,), "blue": (2,), "yellow": (0, 1)}

# Words in OME / ImageJ channel names that identify an HPA channel.
_CHANNEL_ALIASES = {
    "red": ("red", "microtubule", "tubulin", "mt"),
    "green": ("green", "protein", "antibody", "poi", "gfp"),
    "blue": ("blue", "dapi", "hoechst", "nucleus", "nuclei", "dna"),
    "yellow": ("yellow", "er", "calreticulin", "endoplasmic"),
}


class HPAImageError(ValueError):
    """An image that cannot be read as a four-channel HPA image; the message says why and how to fix it."""


@dataclass
class HPAImage:
    """A four-channel HPA field of view.

    Attributes
    ----------
    data : numpy.ndarray
        (4, Y, X) in channel order red, green, blue, yellow; uint8 or uint16.
    image_id : str
        The image id (Kaggle UUID, ``plate_well_field`` or the TIFF's stem).
    paths : dict[str, Path]
        Source file of each channel (the same TIFF for all four for multi-channel TIFFs).
    bit_depth : int
        8 or 16.
    source_format : str
        ``"channels"`` (one file per channel) or ``"tiff"`` (one multi-channel file).
    """

    data: np.ndarray
    image_id: str
    paths: dict[str, Path] = field(default_factory=dict)
    bit_depth: int = 8
    source_format: str = "channels"

    @property
    def shape(self) -> tuple[int, int]:
        """(Y, X)."""
        return tuple(self.data.shape[1:])  # type: ignore[return-value]

    def channel(self, color: str) -> np.ndarray:
        """The (Y, X) plane of one channel by colour name."""
        return self.data[CHANNELS.index(color)]

    @property
    def metadata(self) -> dict:
        """Plain-dict metadata (for napari layers and logs)."""
        return {
            "image_id": self.image_id,
            "paths": {k: str(v) for k, v in self.paths.items()},
            "bit_depth": self.bit_depth,
            "source_format": self.source_format,
        }


#: Pixels per channel file the PNG/JPEG reader accepts. PIL refuses images above ~179 M pixels
#: (its "decompression bomb" guard against hostile files); HPA users' own fields are larger
#: than that only when stitched (a 14000² scan is 196 M), so the limit is raised to 1 G pixels
#: (32768²) here, deliberately, and only when this module reads a file.
MAX_IMAGE_PIXELS = 2**30


def _allow_large_images() -> None:
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_IMAGE_PIXELS // 2:
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS // 2  # PIL errors at twice this value


def to_float(data: np.ndarray) -> np.ndarray:
    """Scale an integer image to float32 in [0, 1] by its dtype's range (float input is returned as float32)."""
    if np.issubdtype(data.dtype, np.integer):
        return data.astype(np.float32) / float(np.iinfo(data.dtype).max)
    return data.astype(np.float32, copy=False)


def parse_channel_filename(path: str | Path) -> tuple[str, str] | None:
    """``(image_id, color)`` for a channel file name, or None if the name does not match."""
    m = CHANNEL_FILE_RE.match(Path(path).name)
    if not m:
        return None
    return m.group("id"), m.group("color").lower()


#: Names of mask files that sit beside images and are never images (``{ID}_cells.tif``, ...).
MASK_STEM_RE = re.compile(r"_(cells|predictedmask|cp_masks|masks?|labels)$", re.IGNORECASE)


class ImageIndex:
    """The HPA images of one folder, found with one directory listing.

    Attributes
    ----------
    folder : Path
        The folder listed.
    channel_files : dict[str, dict[str, Path]]
        Complete channel sets: ``{image id: {colour: file}}``.
    incomplete : dict[str, dict[str, Path]]
        Channel sets that lack a colour (their files, by colour).
    tiffs : dict[str, Path]
        Multi-channel TIFFs by image id (a TIFF named like a complete channel set is left out:
        it is a mask or a copy, and the channel files are the image).
    skipped : dict[str, str]
        Files of the folder that are not read, with the reason (macOS ``._*`` files, broken
        links, masks, duplicate channel files).

    Use :meth:`of` (cached while the folder is unchanged) rather than the constructor, so that
    reading many images of a large folder lists it once, not once per image.
    """

    _cache: dict[str, tuple[int, ImageIndex]] = {}
    _lock = threading.Lock()

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        groups: dict[str, dict[str, Path]] = {}
        tiffs: dict[str, Path] = {}
        skipped: dict[str, str] = {}
        with os.scandir(self.folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            name = entry.name
            if name.startswith("._"):
                skipped[name] = "macOS metadata file (._*), not an image"
                continue
            if name.startswith("."):
                continue  # hidden files, our temporary files
            parsed = parse_channel_filename(name)
            is_tiff = TIFF_RE.search(name) is not None
            if not (parsed or is_tiff):
                continue
            if entry.is_symlink() and not os.path.exists(entry.path):
                skipped[name] = f"broken link (its target {os.readlink(entry.path)} does not exist)"
                continue
            if not entry.is_file():
                continue
            if parsed:
                image_id, color = parsed
                have = groups.setdefault(image_id, {})
                if color in have:
                    skipped[name] = f"a second {color} file of {image_id} (using {have[color].name})"
                else:
                    have[color] = Path(entry.path)
            else:
                stem = TIFF_RE.sub("", name)
                if MASK_STEM_RE.search(stem):
                    skipped[name] = "a mask file, not an image"
                else:
                    tiffs[stem] = Path(entry.path)
        self.channel_files = {k: v for k, v in groups.items() if len(v) == 4}
        self.incomplete = {k: v for k, v in groups.items() if len(v) < 4}
        for image_id in [t for t in tiffs if t in self.channel_files]:
            skipped[tiffs.pop(image_id).name] = (f"named like the image {image_id} whose four channel files are "
                                                 "here (a mask or a copy?); the channel files are read")
        self.tiffs = tiffs
        self.skipped = skipped

    @classmethod
    def of(cls, folder: str | Path) -> ImageIndex:
        """The index of ``folder``, listed again only when the folder changed (its mtime)."""
        folder = Path(folder)
        try:
            key, mtime = str(folder.resolve()), folder.stat().st_mtime_ns
        except FileNotFoundError:
            raise FileNotFoundError(f"folder {folder} does not exist") from None
        with cls._lock:
            hit = cls._cache.get(key)
            if hit is not None and hit[0] == mtime:
                return hit[1]
        index = cls(folder)
        with cls._lock:
            if len(cls._cache) > 64:
                cls._cache.clear()
            cls._cache[key] = (mtime, index)
        return index

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.channel_files or image_id in self.tiffs

    def __len__(self) -> int:
        return len(self.channel_files) + len(self.tiffs)

    @property
    def ids(self) -> list[str]:
        """Sorted ids of the complete images (channel sets with four files and TIFFs)."""
        return sorted(set(self.channel_files) | set(self.tiffs))

    def all_ids(self) -> list[str]:
        """Sorted ids including incomplete channel sets (whose reading reports what is missing)."""
        return sorted(set(self.ids) | set(self.incomplete))

    def files(self, image_id: str) -> list[Path]:
        """The files that hold one image."""
        if image_id in self.channel_files:
            return list(self.channel_files[image_id].values())
        if image_id in self.tiffs:
            return [self.tiffs[image_id]]
        return list(self.incomplete.get(image_id, {}).values())

    def channel_set(self, image_id: str) -> dict[str, Path]:
        """The four channel files of ``image_id``, keyed by colour.

        Raises
        ------
        FileNotFoundError
            Naming the missing colours, the files that were found and any broken link.
        """
        if image_id in self.channel_files:
            return {c: self.channel_files[image_id][c] for c in CHANNELS}
        found = self.incomplete.get(image_id, {})
        missing = [c for c in CHANNELS if c not in found]
        have = ", ".join(sorted(p.name for p in found.values())) or "none"
        broken = [n for n, why in self.skipped.items()
                  if why.startswith("broken link") and (parse_channel_filename(n) or ("",))[0] == image_id]
        hint = f" ({', '.join(broken)}: broken link)" if broken else ""
        raise FileNotFoundError(
            f"image {image_id!r} in {self.folder}: missing the {', '.join(missing)} channel "
            f"file{'s' if len(missing) > 1 else ''}{hint} (found: {have}). Each HPA image needs four files "
            f"named {image_id}_red/_green/_blue/_yellow with extension .png, .jpg or .tif."
        )

    def read(self, image_id: str, channels: Sequence[str] | None = None) -> HPAImage:
        """Read one image of the folder.

        Raises
        ------
        FileNotFoundError
            No such image, or a channel file is missing (the message names them).
        HPAImageError
            A file that cannot be read as (part of) a four-channel HPA image.
        """
        if image_id in self.tiffs:
            return read_multichannel_tiff(self.tiffs[image_id], channels=channels, image_id=image_id)
        if image_id in self.channel_files or image_id in self.incomplete:
            return read_channel_set(self.channel_set(image_id), image_id)
        raise FileNotFoundError(f"image {image_id!r} not found in {self.folder}")


def resolve_images_dir(folder: str | Path) -> Path:
    """The folder that holds the images: ``folder`` itself, or its ``images/`` / ``train/`` / ``test/`` subfolder.

    Lets users point at a Kaggle-layout data set root (``root/train.csv`` + ``root/images``).
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder")
    if _has_images(folder):
        return folder
    for sub in ("images", "train", "test"):
        if (folder / sub).is_dir() and _has_images(folder / sub):
            return folder / sub
    return folder


def _has_images(folder: Path) -> bool:
    index = ImageIndex.of(folder)
    return bool(index.channel_files or index.tiffs or index.incomplete)


def image_index(folder: str | Path) -> ImageIndex:
    """The :class:`ImageIndex` of the images folder of ``folder`` (:func:`resolve_images_dir`)."""
    return ImageIndex.of(resolve_images_dir(folder))


class NoImagesError(FileNotFoundError):
    """A folder with no HPA image in it; the message says what the files must be called."""

    def __init__(self, folder: str | Path) -> None:
        index = ImageIndex.of(folder) if Path(folder).is_dir() else None
        hint = ""
        if index is not None and index.skipped:
            name, why = next(iter(index.skipped.items()))
            hint = f" ({len(index.skipped)} file(s) there are not read, e.g. {name}: {why})"
        super().__init__(
            f"{folder} holds no HPA images: expected files named ID_red.png, ID_green.png, "
            f"ID_blue.png, ID_yellow.png (or .jpg/.tif), or multi-channel TIFFs{hint}.")


def folder_image_ids(folder: str | Path, image_ids=None) -> tuple[Path, list[str]]:
    """The images folder of ``folder`` and the ids to work on (``image_ids`` sorted, else every
    image there); what every folder run starts with.

    Raises
    ------
    NoImagesError
        When there is none.
    """
    images_dir = resolve_images_dir(folder)
    ids = sorted(image_ids) if image_ids is not None else list_image_ids(images_dir)
    if not ids:
        raise NoImagesError(images_dir)
    return images_dir, ids


def list_image_ids(folder: str | Path, complete_only: bool = False) -> list[str]:
    """Sorted image ids in a folder: channel-file sets plus multi-channel TIFFs.

    Parameters
    ----------
    folder
        The images folder (or a data set root holding ``images/``).
    complete_only
        Only ids with all four channel files (multi-channel TIFFs always count).
    """
    index = ImageIndex.of(resolve_images_dir(folder))
    return index.ids if complete_only else index.all_ids()


def find_channel_files(folder: str | Path, image_id: str) -> dict[str, Path]:
    """The four channel files of ``image_id`` in ``folder``, keyed by colour.

    Raises
    ------
    FileNotFoundError
        Naming the missing colours and the files that were found.
    """
    return ImageIndex.of(resolve_images_dir(folder)).channel_set(image_id)


def glob_escape(s: str) -> str:
    """Escape glob metacharacters in an image id."""
    return re.sub(r"([\[\]\*\?])", r"[\1]", s)


def _read_plane(path: Path, color: str) -> np.ndarray:
    """One channel file as a 2-D array, taking the signal from the colour planes of RGB files."""
    name = path.name.lower()
    try:
        if name.endswith((".tif.gz", ".tiff.gz")):
            import tifffile

            with gzip.open(path, "rb") as fh:
                arr = tifffile.imread(_io.BytesIO(fh.read()))
        elif TIFF_RE.search(name):
            import tifffile

            arr = tifffile.imread(path)
        else:
            from PIL import Image

            _allow_large_images()
            with Image.open(path) as im:
                im.load()
                if im.mode in ("I;16", "I;16B", "I;16L"):
                    arr = np.array(im, dtype=np.uint16)
                elif im.mode == "I":
                    arr = np.array(im)
                    arr = arr.astype(np.uint16) if arr.max() <= 65535 else arr
                elif im.mode in ("L", "RGB", "RGBA", "LA"):
                    arr = np.array(im)
                else:
                    arr = np.array(im.convert("RGB"))
    except MemoryError:
        raise
    except Exception as e:  # PIL/tifffile raise many types for broken files
        if type(e).__name__ == "DecompressionBombError":
            raise HPAImageError(
                f"cannot read {path}: {e} The image is larger than this reader's limit of "
                f"{MAX_IMAGE_PIXELS:,} pixels per channel; tile it (e.g. into 4096² fields) or save it as a "
                "TIFF, which has no such limit.") from e
        if isinstance(e, OSError) and getattr(e, "errno", None) is not None:
            raise HPAImageError(f"cannot read {path}: {e.strerror or e}") from e
        raise HPAImageError(
            f"cannot read {path}: {type(e).__name__}: {e}. The file is corrupt, truncated or not an "
            "image; re-download or re-export it (other images are not affected)."
        ) from e
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] in (2, 3, 4):  # colour-stored channel (HPA archive JPEGs)
        planes = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
        if planes.shape[-1] == 3:
            idx = _COLOR_PLANES[color]
            sig = planes[..., idx].astype(np.float32).mean(axis=-1)
            arr = np.clip(np.rint(sig), 0, np.iinfo(arr.dtype).max).astype(arr.dtype)
        else:
            arr = planes[..., 0]
    if arr.ndim != 2:
        raise HPAImageError(
            f"{path}: expected one 2-D channel, got an array of shape {arr.shape}. Multi-channel "
            "files must be TIFFs opened with read_multichannel_tiff."
        )
    if arr.dtype not in (np.uint8, np.uint16):
        if np.issubdtype(arr.dtype, np.floating):
            mx = float(np.nanmax(arr)) if arr.size else 0.0
            arr = np.clip(arr * (255.0 if mx <= 1.0 else 1.0), 0, 65535)
            arr = arr.astype(np.uint16 if mx > 255 else np.uint8)
        else:
            arr = np.clip(arr, 0, 65535).astype(np.uint16)
    return arr


def read_channel_set(files: dict[str, Path], image_id: str) -> HPAImage:
    """Read four channel files into an :class:`HPAImage` (checks shapes; mixed depths go to 16-bit)."""
    planes = {c: _read_plane(Path(files[c]), c) for c in CHANNELS}
    shapes = {c: p.shape for c, p in planes.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{Path(files[c]).name}: {shapes[c][1]}x{shapes[c][0]}" for c in CHANNELS)
        raise HPAImageError(
            f"image {image_id!r}: the channel files have different sizes ({desc}). All four channels "
            "of one field of view must have the same size; re-export the odd one."
        )
    dtype = np.uint16 if any(p.dtype == np.uint16 for p in planes.values()) else np.uint8
    if dtype == np.uint16 and any(p.dtype == np.uint8 for p in planes.values()):
        log.warning("image %s mixes 8- and 16-bit channels; scaling 8-bit ones to 16-bit", image_id)
        planes = {c: (p.astype(np.uint16) * 257 if p.dtype == np.uint8 else p) for c, p in planes.items()}
    data = np.stack([planes[c] for c in CHANNELS]).astype(dtype, copy=False)
    return HPAImage(
        data=data,
        image_id=image_id,
        paths={c: Path(files[c]) for c in CHANNELS},
        bit_depth=16 if dtype == np.uint16 else 8,
        source_format="channels",
    )


def _channel_names_from_tiff(tif) -> list[str] | None:
    """Channel names from OME-XML (or ImageJ 'Labels'), or None."""
    xml = getattr(tif, "ome_metadata", None)
    if xml:
        try:
            root = ET.fromstring(xml)
            names = [el.attrib.get("Name", "") for el in root.iter() if el.tag.endswith("}Channel") or el.tag == "Channel"]
            if names and all(names):
                return names
        except ET.ParseError:
            pass
    ij = getattr(tif, "imagej_metadata", None) or {}
    labels = ij.get("Labels") if isinstance(ij, dict) else None
    if labels:
        return list(labels)
    return None


def _color_for_name(name: str) -> str | None:
    key = name.strip().lower()
    if key in CHANNELS:
        return key
    words = set(re.split(r"[^a-z0-9]+", key))
    for color, aliases in _CHANNEL_ALIASES.items():
        if any(a in words or (len(a) > 3 and a in key) for a in aliases):
            return color
    return None


def read_multichannel_tiff(
    path: str | Path, channels: Sequence[str] | None = None, image_id: str | None = None
) -> HPAImage:
    """Read a (C, Y, X) TIFF / OME-TIFF.

    Parameters
    ----------
    path
        The TIFF file.
    channels
        The colour (``red``/``green``/``blue``/``yellow``) of each channel *in file order*;
        when omitted the OME / ImageJ channel names decide, and without names the file order
        is taken to be red, green, blue, yellow (with a warning).
    image_id
        Defaults to the file stem.
    """
    import tifffile

    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            arr = series.asarray()
            axes = series.axes
            names = _channel_names_from_tiff(tif)
            desc = (tif.pages.first.description or "") if tif.pages else ""
    except Exception as e:
        raise HPAImageError(
            f"cannot read {path}: {type(e).__name__}: {e}. The TIFF is corrupt or truncated; re-export it."
        ) from e
    arr = np.asarray(arr)
    # Bring the channel axis first and drop singleton T/Z axes.
    caxis = None
    for ax in ("C", "S"):
        if ax in axes and arr.shape[axes.index(ax)] > 1:
            caxis = axes.index(ax)
            break
    if caxis is None and arr.ndim == 3 and min(arr.shape) <= 16 and min(arr.shape) * 2 < sorted(arr.shape)[1]:
        caxis = int(np.argmin(arr.shape))  # (C, Y, X) or (Y, X, C) with a few channels
    if caxis is None:
        if '"napari_cpgcn": "cell mask"' in desc:
            raise HPAImageError(
                f"{path} is a cell mask written by napari-cpgcn, not an image; keep masks out of the "
                "images folder (napari-cpgcn writes them to its own output folders)")
        what = "a single-channel image" if arr.ndim == 2 or min(arr.shape) == 1 else "an image"
        raise HPAImageError(
            f"{path}: found {what} of shape {arr.shape} with no channel axis. An HPA image needs four "
            "channels: give one multi-channel TIFF or four files named ID_red/_green/_blue/_yellow."
        )
    arr = np.moveaxis(arr, caxis, 0)
    arr = arr.reshape(arr.shape[0], *[s for s in arr.shape[1:] if s != 1][-2:]) if arr.ndim > 3 else arr
    n = arr.shape[0]
    if channels is None and names is not None and len(names) == n:
        mapped = [_color_for_name(nm) for nm in names]
        if sorted(c for c in mapped if c) == sorted(CHANNELS):  # each colour once; others skipped
            channels = [c or "skip" for c in mapped]
        else:
            log.warning("%s: channel names %s do not map onto red/green/blue/yellow", path, names)
    if channels is None:
        if n == 4:
            log.warning("%s: no channel names in the metadata; assuming the order red, green, blue, yellow", path)
            channels = list(CHANNELS)
        else:
            raise HPAImageError(
                f"{path}: {n} channels, but an HPA image has 4 (red microtubules, green protein, "
                f"blue nucleus, yellow ER). {'This looks like an RGB composite, which has lost the yellow channel. ' if n == 3 else ''}"
                "Give the four original channels, or name each channel's colour in file order "
                "(channels=[...], 'skip' for a channel that is none of them)."
            )
    channels = [c.lower() for c in channels]
    if len(channels) != n:
        raise HPAImageError(f"{path}: {n} channels in the file but {len(channels)} names given ({channels})")
    unknown = [c for c in channels if c not in CHANNELS and c != "skip"]
    if unknown:
        raise HPAImageError(f"{path}: unknown channel colour(s) {unknown}; use red, green, blue, yellow "
                            "(or 'skip')")
    twice = sorted({c for c in channels if c != "skip" and channels.count(c) > 1})
    if twice:
        raise HPAImageError(f"{path}: the colour(s) {twice} are given to more than one channel ({channels})")
    missing = [c for c in CHANNELS if c not in channels]
    if missing:
        raise HPAImageError(f"{path}: no {', '.join(missing)} channel among {channels}")
    data = np.stack([arr[channels.index(c)] for c in CHANNELS])
    if data.dtype not in (np.uint8, np.uint16):
        data = np.clip(data, 0, 65535).astype(np.uint16)
    return HPAImage(
        data=data,
        image_id=image_id or TIFF_RE.sub("", path.name),
        paths={c: path for c in CHANNELS},
        bit_depth=16 if data.dtype == np.uint16 else 8,
        source_format="tiff",
    )


def read_image(
    path: str | Path, image_id: str | None = None, channels: Sequence[str] | None = None
) -> HPAImage:
    """Read one HPA image from a channel file, a folder (+ id) or a multi-channel TIFF.

    Parameters
    ----------
    path
        Any one of an image's channel files (``ID_green.png``), a folder holding the image
        (with ``image_id`` when it holds several), or a multi-channel TIFF.
    image_id
        Which image of the folder.
    channels
        Channel colours in file order, for multi-channel TIFFs without metadata.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        index = ImageIndex.of(resolve_images_dir(path))
        if image_id is None:
            ids = index.all_ids()
            if not ids:
                raise NoImagesError(index.folder)
            if len(ids) > 1:
                raise HPAImageError(
                    f"{path} holds {len(ids)} images ({', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''}); "
                    "say which one with image_id."
                )
            image_id = ids[0]
        return index.read(image_id, channels=channels)
    parsed = parse_channel_filename(path)
    if parsed:
        return ImageIndex.of(path.parent).read(parsed[0])
    if TIFF_RE.search(path.name):
        return read_multichannel_tiff(path, channels=channels, image_id=image_id)
    if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        mode = ""
        try:
            from PIL import Image

            with Image.open(path) as im:
                mode = im.mode
        except Exception:
            pass
        hint = (" It is a colour (RGB) composite: a composite has merged the channels and lost the "
                "yellow ER channel, so it cannot be split back into the four HPA channels."
                if mode in ("RGB", "RGBA") else "")
        raise HPAImageError(
            f"{path} is not an HPA channel file.{hint} Give the four original channel files named "
            f"ID_red, ID_green, ID_blue and ID_yellow (.png/.jpg/.tif), or one 4-channel TIFF."
        )
    raise HPAImageError(f"{path}: unsupported file type; expected PNG/JPEG channel files or a TIFF")
