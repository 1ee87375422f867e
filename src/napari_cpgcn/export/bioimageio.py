"""bioimage.io model packages (spec 0.5) of a trained run, and reading them back as a backbone start.

:func:`export_bioimageio` writes a zip that bioimage.io consumers (bioimageio.core, ilastik,
deepImageJ, Fiji) run without napari-cpgcn: the model description is built with
``bioimageio.spec`` (``ModelDescr`` v0.5) and packaged by ``save_bioimageio_package``.

What a package holds
--------------------
* **Weights** in two formats: TorchScript (runs anywhere PyTorch runs) and a plain PyTorch
  state dict whose architecture is :class:`ImageModelForBioimageio` /
  :class:`CellModelForBioimageio` of this module (for Python users with napari-cpgcn, and for
  ``--init-from``, which reads it with ``torch.load(weights_only=True)``).
* **Input** ``image`` (image model: a whole field of view) or ``crop`` (cell model: one cell
  crop): ``(batch, channel, y, x)`` uint8, channels red (microtubules), green (protein), blue
  (nucleus), yellow (ER), any size >= 32 px. Preprocessing is the run's own normalisation:
  ``ensure_dtype float32`` → ``scale_linear`` 1/255 → ``fixed_zero_mean_unit_variance`` with
  the model's per-channel mean and std. The network resizes its input to the size it was
  trained at (antialiased bilinear), as napari-cpgcn does.
* **Outputs** ``probabilities`` ``(batch, channel)`` with the 19 class short names as channel
  names; the image model also outputs ``cams`` ``(batch, channel, y, x)``, the class maps
  (each scaled to [0, 1] by its maximum) upsampled to the input size.
* **Test tensors** computed by napari-cpgcn's own inference (``predict_images`` /
  ``predict_crops``) on a synthetic HPA image, so ``bioimageio test`` checks that a consumer
  reproduces napari-cpgcn's predictions; a **cover** (PNG); a README; licence BSD-3-Clause;
  the CP-GCN citation; in ``config.napari_cpgcn`` the class names, backbone, normalisation and
  crop settings.

Optional dependencies: ``pip install napari-cpgcn[bioimageio]`` (``bioimageio.spec``,
``bioimageio.core``); they are imported only when a package is written or tested. Reading a
package back (:func:`read_package_checkpoint`) needs only torch and PyYAML.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_cpgcn.classes import CHANNEL_STAINS, CHANNELS, CLASS_NAMES, SHORT_NAMES
from napari_cpgcn.training.checkpoint import CheckpointError

__all__ = [
    "INSTALL_HINT",
    "CITATION_DOI",
    "CITATION_TEXT",
    "BioimageioExportError",
    "PackageError",
    "ExportResult",
    "ImageModelForBioimageio",
    "CellModelForBioimageio",
    "export_bioimageio",
    "test_package",
    "is_bioimageio_package",
    "read_package_checkpoint",
]

log = logging.getLogger(__name__)

#: How to get the optional packages this module needs.
INSTALL_HINT = "pip install napari-cpgcn[bioimageio]"
CITATION_DOI = "10.16476/j.pibb.2025.0047"
CITATION_TEXT = (
    "Tang et al. CP-GCN: single-cell protein subcellular localisation in immunofluorescence images "
    "from image-level labels with a class perception module and a label graph convolutional network. "
    "Progress in Biochemistry and Biophysics, 2025."
)
#: Key of this package's section in the model description's ``config``.
CONFIG_KEY = "napari_cpgcn"
_STATE_DICT_FILE = "weights_state_dict.pt"
_TORCHSCRIPT_FILE = "weights_torchscript.pt"
#: Smallest input side the exported networks accept (they resize internally).
MIN_SIDE = 32


class BioimageioExportError(ValueError):
    """A run cannot be exported (no checkpoint, missing packages, unwritable output); the message says why."""


class PackageError(CheckpointError):
    """A bioimage.io package cannot be used here (not ours, another class set or backbone, corrupt)."""


def _require_bioimageio():
    try:
        import bioimageio.core  # noqa: F401
        import bioimageio.spec  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"writing and testing bioimage.io packages needs bioimageio.spec and bioimageio.core ({e}); "
            f"install them with `{INSTALL_HINT}`") from e


# --------------------------------------------------------------------------- exported networks

class ImageModelForBioimageio(nn.Module):
    """The image-level model as bioimage.io runs it: normalised input → probabilities (+ class maps).

    The consumer applies the package's preprocessing (the run's per-channel mean/std), so the
    backbone's own normalisation is skipped here; the input is resized to the training size
    inside the network, which makes any input size work.

    Parameters
    ----------
    config
        The run's :class:`~napari_cpgcn.training.config.ImageModelConfig` as a dict (it is
        stored in the package's ``architecture.kwargs``).
    with_cams
        Also return the class maps at input resolution.
    """

    def __init__(self, config: dict[str, Any], with_cams: bool = True) -> None:
        super().__init__()
        from napari_cpgcn.models import build_image_model
        from napari_cpgcn.training.config import ImageModelConfig

        cfg = ImageModelConfig.from_dict(dict(config))
        self.model = build_image_model(cfg, weights=None)
        self.image_size = int(cfg.image_size)
        self.with_cams = bool(with_cams)

    def forward(self, x: torch.Tensor):
        from napari_cpgcn.models.cpgcn import normalize_cams

        size = (x.shape[-2], x.shape[-1])
        z = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                          align_corners=False)
        logits, cams = self.model.forward_head(self.model.backbone.trunk(z))
        probs = torch.sigmoid(logits)
        if not self.with_cams:
            return probs
        cams = F.interpolate(normalize_cams(cams), size=size, mode="bilinear", align_corners=False)
        return probs, cams


class CellModelForBioimageio(nn.Module):
    """The single-cell classifier as bioimage.io runs it: a normalised cell crop → probabilities.

    Parameters
    ----------
    config
        The run's :class:`~napari_cpgcn.training.cell_trainer.CellModelConfig` as a dict.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        from napari_cpgcn.models.cell import build_cell_model
        from napari_cpgcn.training.cell_trainer import CellModelConfig

        cfg = CellModelConfig.from_dict(dict(config))
        self.model = build_cell_model(cfg, weights=None)
        self.crop_size = int(cfg.crop_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.interpolate(x, size=(self.crop_size, self.crop_size), mode="bilinear", antialias=True,
                          align_corners=False)
        return torch.sigmoid(self.model.forward_head(self.model.backbone.trunk(z)))


# --------------------------------------------------------------------------- export

@dataclass
class ExportResult:
    """What :func:`export_bioimageio` wrote.

    Attributes
    ----------
    path : Path
        The package (.zip).
    which : str
        ``"image"`` or ``"cell"``.
    checkpoint : Path
        The napari-cpgcn checkpoint that was exported.
    weight_formats : list[str]
        Weight formats in the package.
    outputs : list[str]
        Output tensor ids.
    """

    path: Path
    which: str
    checkpoint: Path
    weight_formats: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def _load_run_model(run: str | Path, which: str):
    """(model, config, checkpoint path, checkpoint dict) of the run's image or cell model."""
    from napari_cpgcn.training.checkpoint import load_checkpoint, resolve_init_checkpoint

    stage = "image_model" if which == "image" else "cell_model"
    try:
        ckpt_path = resolve_init_checkpoint(run, stage)
    except FileNotFoundError as e:
        raise BioimageioExportError(
            f"{run}: nothing to export as the {which} model ({e}). Give a run folder made by "
            "`napari-cpgcn train` (or `train-image` for --which image) or its checkpoint") from e
    try:
        if which == "image":
            from napari_cpgcn.training.checkpoint import load_image_model

            model, config = load_image_model(ckpt_path, "cpu", classes=None)
        else:
            from napari_cpgcn.training.checkpoint import load_cell_model

            model, config, _ = load_cell_model(ckpt_path, "cpu")
    except CheckpointError as e:
        raise BioimageioExportError(f"{ckpt_path} cannot be exported as the {which} model: {e}") from e
    return model, config, ckpt_path, load_checkpoint(ckpt_path, "cpu")


def _test_image(size: int, seed: int) -> np.ndarray:
    """A synthetic HPA field of view (4, size, size) uint8 — known, reproducible test input."""
    from napari_cpgcn.synth import generate_image

    return generate_image(seed, size=size, heterogeneity=0.3, image_id="bioimageio_test").data


def _test_crop(size: int, seed: int, config) -> np.ndarray:
    """One cell crop (4, size, size) uint8 of a synthetic image, cut as napari-cpgcn cuts crops."""
    from napari_cpgcn.io.celltable import cell_geometry
    from napari_cpgcn.models.cell import crop_cell
    from napari_cpgcn.synth import generate_image

    img = generate_image(seed, size=max(4 * size, 256), heterogeneity=0.3, image_id="bioimageio_test")
    geo = cell_geometry(img.cells)
    row = geo.iloc[int(np.argmax(geo["area"].to_numpy()))]  # the largest cell: a full crop
    bbox = tuple(int(row[k]) for k in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"))
    crop = crop_cell(img.data, img.cells, int(row["cell_id"]), bbox, size=size,
                     zero_background=config.zero_background, pad=config.crop_pad)
    return np.clip(np.rint(crop * 255.0), 0, 255).astype(np.uint8)


def _cover(path: Path, image: np.ndarray, probs: np.ndarray, cam: np.ndarray | None, title: str) -> None:
    """A 2:1 PNG: the test input as an HPA composite and its top classes (or the top class's map)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from napari_cpgcn.synth import composite

    fig = Figure(figsize=(8, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax0, ax1 = fig.subplots(1, 2)
    rgb = composite(image)
    ax0.imshow(rgb)
    ax0.set_axis_off()
    ax0.set_title("input (red, green, blue, yellow)", fontsize=9)
    order = np.argsort(-probs)[:6]
    if cam is not None:
        ax1.imshow(rgb // 3)
        ax1.imshow(cam, cmap="magma", alpha=0.6, vmin=0, vmax=1)
        ax1.set_axis_off()
        ax1.set_title(f"class map: {CLASS_NAMES[order[0]]} ({probs[order[0]]:.2f})", fontsize=9)
    else:
        ax1.barh(range(len(order))[::-1], probs[order], color="tab:green")
        ax1.set_yticks(range(len(order))[::-1], [CLASS_NAMES[k] for k in order], fontsize=8)
        ax1.set_xlim(0, 1)
        ax1.set_title("cell probabilities", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _readme(which: str, config, meta: dict, with_cams: bool) -> str:
    classes = "\n".join(f"| {k} | `{s}` | {n} |" for k, (s, n) in enumerate(zip(SHORT_NAMES, CLASS_NAMES, strict=True)))
    channels = ", ".join(f"{c} = {CHANNEL_STAINS[c]}" for c in CHANNELS)
    mean = ", ".join(f"{v:.4f}" for v in meta["mean"])
    std = ", ".join(f"{v:.4f}" for v in meta["std"])
    if which == "image":
        what = (
            f"The **image-level model** of CP-GCN ({config.variant}, {config.backbone} backbone): a whole "
            "4-channel HPA field of view in, the 19 image-level class probabilities out"
            + (", and the class activation maps (the model's own class maps, one per class, each scaled "
               "to [0, 1], at the input's size) that napari-cpgcn uses to localise the classes in cells."
               if with_cams else ".")
            + f" The network resizes its input to {config.image_size}² (antialiased bilinear) as it was "
            "trained.")
    else:
        what = (
            f"The **single-cell classifier** of CP-GCN ({config.backbone} backbone): one cell crop in, "
            f"the 19 class probabilities of that cell out. Crops are cut as napari-cpgcn cuts them: the "
            f"square around the cell's bounding box, side = longer bbox side x (1 + 2 x {config.crop_pad}), "
            + ("pixels outside the cell set to 0, " if config.zero_background else "")
            + f"zero padding outside the image; the network resizes the crop to {config.crop_size}². In "
            "CP-GCN the final per-cell score is this probability times the image model's probability.")
    return f"""# CP-GCN {which} model (napari-cpgcn)

{what}

Exported by napari-cpgcn (`napari-cpgcn export-bioimageio`). Method: CP-GCN, {CITATION_TEXT}
doi:{CITATION_DOI}.

## Input
`(batch, channel, y, x)`, uint8, channels {channels} (Human Protein Atlas immunofluorescence;
for 16-bit images divide by 257 first). Preprocessing (in the description): float32, x 1/255,
then per channel (x - mean) / std with mean = [{mean}], std = [{std}] (the training set's statistics).

## Outputs
`probabilities` `(batch, channel)`: sigmoid probabilities of the 19 classes (multi-label).
{"`cams` `(batch, channel, y, x)`: class maps at the input size." if which == "image" and with_cams else ""}

| channel | short name | class |
|---|---|---|
{classes}

## Validation
The test tensors were computed by napari-cpgcn's own inference on a synthetic HPA image
(`napari_cpgcn.synth`); `bioimageio test` checks that both weight formats reproduce them
(napari-cpgcn's export runs that test). Accuracy on real data: see the run's own evaluation
(`napari-cpgcn evaluate`) and docs/benchmarks.md of napari-cpgcn.

## Limitations
Trained on the data of the exported run only; probabilities are not calibrated for other
microscopes or stains. Use within napari-cpgcn for segmentation, cell crops and the fused score.
"""


def export_bioimageio(
    run: str | Path,
    out: str | Path,
    which: str = "image",
    *,
    with_cams: bool = True,
    name: str | None = None,
    authors: Sequence[str] = (),
    test_seed: int = 0,
    overwrite: bool = False,
) -> ExportResult:
    """Write a bioimage.io model package (spec 0.5 zip) of a run's image or cell model.

    Parameters
    ----------
    run
        A pipeline run folder (``napari-cpgcn train``), a ``train-image`` folder, or a
        checkpoint. The image model is the one predictions use (the refined one when present).
    out
        The package to write (``.zip``).
    which
        ``"image"`` (field of view → 19 probabilities, + class maps) or ``"cell"`` (cell crop →
        19 probabilities).
    with_cams
        Image model: also output the class maps.
    name
        The model's name in the description (default: "CP-GCN <which> model (<backbone>)").
    authors
        Who trained the model (default: the login name).
    test_seed
        Seed of the synthetic test image.
    overwrite
        Replace an existing ``out``.

    Returns
    -------
    ExportResult

    Raises
    ------
    BioimageioExportError
        No model of that kind in ``run``, ``out`` exists (without ``overwrite``) or cannot be written.
    ImportError
        ``bioimageio.spec`` is not installed (the message says how to install it).
    """
    if which not in ("image", "cell"):
        raise ValueError(f"which must be 'image' or 'cell', got {which!r}")
    _require_bioimageio()
    out = Path(out).expanduser()
    if out.suffix.lower() != ".zip":
        raise BioimageioExportError(f"{out}: a bioimage.io package is a .zip file; give --out NAME.zip")
    if out.exists() and (out.is_dir() or not overwrite):
        raise BioimageioExportError(f"{out} already exists; choose another --out or pass --overwrite")
    if not out.parent.is_dir():
        raise BioimageioExportError(f"cannot write {out}: the folder {out.parent} does not exist")

    model, config, ckpt_path, ckpt = _load_run_model(run, which)
    meta = dict(ckpt.get("meta", {}))
    # the normalisation the network really applies (its buffers), not what a config says
    meta["mean"] = [float(v) for v in model.backbone.mean.flatten()]
    meta["std"] = [float(v) for v in model.backbone.std.flatten()]
    classes = list(config.classes)
    if len(classes) != len(SHORT_NAMES):
        raise BioimageioExportError(f"{ckpt_path} predicts {len(classes)} classes; only the 19 HPA classes are exported")

    with tempfile.TemporaryDirectory(prefix="cpgcn-bioimageio-") as tmpdir:
        tmp = Path(tmpdir)
        result = _build_package(tmp, out, which, model, config, ckpt_path, ckpt, meta, classes,
                                with_cams=with_cams and which == "image", name=name, authors=authors,
                                test_seed=test_seed)
    log.info("wrote bioimage.io package %s (%s model, weights: %s)", out, which, ", ".join(result.weight_formats))
    return result


def _build_package(tmp: Path, out: Path, which: str, model, config, ckpt_path: Path, ckpt: dict,
                   meta: dict, classes: list[str], *, with_cams: bool, name: str | None,
                   authors: Sequence[str], test_seed: int) -> ExportResult:
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as bmz

    from napari_cpgcn import __version__

    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(ckpt["config"])
    config_dict = {k: v for k, v in config_dict.items() if k not in ("init_from", "imagenet_weights", "cache_dir")}
    if which == "image":
        wrapper: nn.Module = ImageModelForBioimageio(config_dict, with_cams=with_cams)
        size = int(config.image_size)
        test_in = _test_image(size, test_seed)
    else:
        wrapper = CellModelForBioimageio(config_dict)
        size = int(config.crop_size)
        test_in = _test_crop(size, test_seed, config)
    wrapper.model.load_state_dict(model.state_dict(), strict=True)
    wrapper.eval()

    # Test outputs from napari-cpgcn's own inference code: the package must reproduce them.
    if which == "image":
        from napari_cpgcn.pipeline.inference import predict_images

        probs, cams = predict_images(model, [test_in], batch_size=1, cam_method="model", cam_size="image")
        test_out = {"probabilities": probs.astype(np.float32)}
        if with_cams:
            test_out["cams"] = np.asarray(cams, np.float32)
    else:
        from napari_cpgcn.pipeline.inference import predict_crops

        probs = predict_crops(model, test_in[None].astype(np.float32) / 255.0, torch.device("cpu"))
        test_out = {"probabilities": probs.astype(np.float32)}

    # Weights: TorchScript (traced: no Python code in the file) and the plain state dict.
    x = torch.from_numpy(_preprocess(test_in[None], mean=meta["mean"], std=meta["std"]))
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.9+ calls TorchScript deprecated, but it is the format bioimage.io consumers run
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(wrapper, x, check_trace=False)
        for got, (key, want) in zip(_as_tuple(traced(x)), test_out.items(), strict=True):
            err = float(np.abs(got.numpy() - want).max())
            if err > 1e-3:
                raise BioimageioExportError(f"the traced {which} model differs from napari-cpgcn's inference "
                                            f"on {key} by {err:.2g}; this is a bug, please report it")
    ts_path = tmp / _TORCHSCRIPT_FILE
    traced.save(str(ts_path))
    sd_path = tmp / _STATE_DICT_FILE
    torch.save({k: v.detach().cpu() for k, v in wrapper.state_dict().items()}, sd_path)

    in_id = bmz.TensorId("image" if which == "image" else "crop")
    np.save(tmp / f"test_input_{in_id}.npy", test_in[None])
    for key, arr in test_out.items():
        np.save(tmp / f"test_output_{key}.npy", arr)
    cover = tmp / "cover.png"
    _cover(cover, test_in, test_out["probabilities"][0],
           test_out["cams"][0][int(np.argmax(test_out["probabilities"][0]))] if "cams" in test_out else None,
           f"CP-GCN {which} model ({config.backbone})")
    readme = tmp / "README.md"
    readme.write_text(_readme(which, config, meta, with_cams), encoding="utf-8")

    space = bmz.ParameterizedSize(min=MIN_SIDE, step=1)
    inputs = [bmz.InputTensorDescr(
        id=in_id,
        description=("HPA field of view" if which == "image" else "one cell crop") + ": red, green, blue, yellow",
        axes=[bmz.BatchAxis(),
              bmz.ChannelAxis(channel_names=[bmz.Identifier(c) for c in CHANNELS]),
              bmz.SpaceInputAxis(id=bmz.AxisId("y"), size=space),
              bmz.SpaceInputAxis(id=bmz.AxisId("x"), size=space)],
        data=bmz.IntervalOrRatioDataDescr(type="uint8", range=(0, 255)),
        test_tensor=bmz.FileDescr(source=tmp / f"test_input_{in_id}.npy"),
        preprocessing=[
            bmz.EnsureDtypeDescr(kwargs=bmz.EnsureDtypeKwargs(dtype="float32")),
            bmz.ScaleLinearDescr(kwargs=bmz.ScaleLinearKwargs(gain=1.0 / 255.0)),
            bmz.FixedZeroMeanUnitVarianceDescr(kwargs=bmz.FixedZeroMeanUnitVarianceAlongAxisKwargs(
                mean=meta["mean"], std=meta["std"], axis=bmz.AxisId("channel"))),
            # stated explicitly: otherwise the spec appends a cast back to the input's uint8
            bmz.EnsureDtypeDescr(kwargs=bmz.EnsureDtypeKwargs(dtype="float32")),
        ],
    )]
    class_axis = bmz.ChannelAxis(channel_names=[bmz.Identifier(s) for s in classes])
    prob = bmz.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0))
    outputs = [bmz.OutputTensorDescr(
        id=bmz.TensorId("probabilities"),
        description="sigmoid probability of each of the 19 HPA classes (multi-label)",
        axes=[bmz.BatchAxis(), class_axis], data=prob,
        test_tensor=bmz.FileDescr(source=tmp / "test_output_probabilities.npy"),
    )]
    if "cams" in test_out:
        outputs.append(bmz.OutputTensorDescr(
            id=bmz.TensorId("cams"),
            description="class activation map of each class, scaled to [0, 1], at the input size",
            axes=[bmz.BatchAxis(), class_axis,
                  bmz.SpaceOutputAxis(id=bmz.AxisId("y"), size=bmz.SizeReference(tensor_id=in_id, axis_id=bmz.AxisId("y"))),
                  bmz.SpaceOutputAxis(id=bmz.AxisId("x"), size=bmz.SizeReference(tensor_id=in_id, axis_id=bmz.AxisId("x")))],
            data=prob,
            test_tensor=bmz.FileDescr(source=tmp / "test_output_cams.npy"),
        ))
    pytorch_version = bmz.Version(torch.__version__.split("+")[0])
    kwargs: dict[str, Any] = {"config": config_dict}
    if which == "image":
        kwargs["with_cams"] = with_cams
    weights = bmz.WeightsDescr(
        torchscript=bmz.TorchscriptWeightsDescr(source=ts_path, pytorch_version=pytorch_version,
                                               parent="pytorch_state_dict"),
        pytorch_state_dict=bmz.PytorchStateDictWeightsDescr(
            source=sd_path, pytorch_version=pytorch_version,
            architecture=bmz.ArchitectureFromLibraryDescr(
                callable=bmz.Identifier(type(wrapper).__name__), import_from=__name__, kwargs=kwargs),
        ),
    )
    ours = {
        "kind": which,
        "classes": classes,
        "class_names": list(CLASS_NAMES),
        "channels": list(CHANNELS),
        "backbone": str(config.backbone),
        "mean": meta["mean"],
        "std": meta["std"],
        "checkpoint_digest": str(ckpt.get("digest", "")),
        "checkpoint_meta": _jsonable(ckpt.get("meta", {})),
        "napari_cpgcn_version": __version__,
    }
    if which == "image":
        ours.update(variant=str(config.variant), image_size=int(config.image_size))
    else:
        ours.update(crop_size=int(config.crop_size), crop_pad=float(config.crop_pad),
                    zero_background=bool(config.zero_background))
    names = [a for a in authors if a] or [_login_name()]
    descr = bmz.ModelDescr(
        name=name or f"CP-GCN {which} model ({config.backbone})",
        description=(f"CP-GCN {'image-level' if which == 'image' else 'single-cell'} classifier of protein "
                     "subcellular localisation (19 HPA classes) in 4-channel immunofluorescence images, "
                     "exported by napari-cpgcn"),
        authors=[bmz.Author(name=a) for a in names],
        cite=[bmz.CiteEntry(text=CITATION_TEXT, doi=bmz.Doi(CITATION_DOI))],
        license=bmz.LicenseId("BSD-3-Clause"),
        documentation=bmz.FileDescr(source=readme),
        covers=[bmz.FileDescr(source=cover)],
        tags=["human-protein-atlas", "protein-localization", "classification", "immunofluorescence",
              "2d", "pytorch", "cp-gcn", "napari-cpgcn", "cell" if which == "cell" else "image"],
        inputs=inputs,
        outputs=outputs,
        weights=weights,
        config=bmz.Config(**{CONFIG_KEY: ours}),
    )
    tmp_zip = out.with_name(f".{out.name}.partial")
    try:
        # stored, not deflated: float weights hardly compress and deflating them took ~10 s per 100 MB
        save_bioimageio_package(descr, output_path=tmp_zip, compression=zipfile.ZIP_STORED)
        tmp_zip.replace(out)
    except OSError as e:
        tmp_zip.unlink(missing_ok=True)
        raise BioimageioExportError(f"cannot write {out}: {e}") from e
    except BaseException:
        tmp_zip.unlink(missing_ok=True)
        raise
    return ExportResult(path=out, which=which, checkpoint=ckpt_path,
                        weight_formats=["torchscript", "pytorch_state_dict"], outputs=list(test_out))


def _as_tuple(y) -> tuple[torch.Tensor, ...]:
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def _preprocess(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The package's preprocessing in numpy: uint8 (B, 4, Y, X) → normalised float32."""
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return ((x.astype(np.float32) * np.float32(1.0 / 255.0) - m) / s).astype(np.float32)


def _jsonable(d: Any) -> Any:
    if isinstance(d, dict):
        return {str(k): _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if isinstance(d, (str, int, float, bool)) or d is None:
        return d
    return str(d)


def _login_name() -> str:
    import getpass

    try:
        return getpass.getuser() or "napari-cpgcn user"
    except Exception:  # no login name in some containers
        return "napari-cpgcn user"


# --------------------------------------------------------------------------- test

def test_package(path: str | Path, devices: Sequence[str] | None = ("cpu",)):
    """Run bioimageio.core's model test (the ``bioimageio test`` command) on a package.

    Returns the ``ValidationSummary``; ``summary.status == "passed"`` when every weight format
    reproduces the test outputs. ``devices=None`` lets bioimageio.core choose (CUDA if present).
    """
    _require_bioimageio()
    from bioimageio.core import test_model

    return test_model(str(path), devices=list(devices) if devices else None)


test_package.__test__ = False  # not a pytest test, despite its name


# --------------------------------------------------------------------------- read back (--init-from)

def is_bioimageio_package(path: str | Path) -> bool:
    """Whether ``path`` is a bioimage.io package: a zip holding ``rdf.yaml`` / ``bioimageio.yaml``."""
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        return False
    try:
        with zipfile.ZipFile(p) as z:
            return any(n in z.namelist() for n in ("rdf.yaml", "bioimageio.yaml"))
    except (OSError, zipfile.BadZipFile):
        return False


def _read_rdf(z: zipfile.ZipFile, path: Path) -> dict:
    import yaml

    name = next(n for n in ("bioimageio.yaml", "rdf.yaml") if n in z.namelist())
    try:
        rdf = yaml.safe_load(z.read(name))
    except yaml.YAMLError as e:
        raise PackageError(f"{path}: its {name} cannot be read ({e})") from e
    if not isinstance(rdf, dict):
        raise PackageError(f"{path}: its {name} is not a model description")
    return rdf


def read_package_checkpoint(path: str | Path, backbone: str | None = None,
                            classes: Sequence[str] | None = tuple(SHORT_NAMES)) -> dict[str, Any]:
    """A napari-cpgcn bioimage.io package as a checkpoint-like dict, for ``--init-from``.

    Parameters
    ----------
    path
        A package written by :func:`export_bioimageio`.
    backbone
        Required backbone (None: any).
    classes
        Required class short names, in order (None: any).

    Returns
    -------
    dict
        ``{"meta": {"backbone", "classes", "kind", ...}, "model": state dict}`` whose ``model``
        keys are those of the exported napari-cpgcn model (``backbone.*`` for the backbone),
        read with ``torch.load(weights_only=True)`` after checking the file's SHA-256 against
        the description.

    Raises
    ------
    PackageError
        Not a package, not made by napari-cpgcn, another class set or backbone, a corrupt or
        modified weights file.
    """
    p = Path(path)
    if not is_bioimageio_package(p):
        raise PackageError(f"{p} is not a bioimage.io model package (a .zip holding rdf.yaml)")
    with zipfile.ZipFile(p) as z:
        rdf = _read_rdf(z, p)
        ours = (rdf.get("config") or {}).get(CONFIG_KEY)
        if rdf.get("type") != "model" or not isinstance(ours, dict):
            raise PackageError(
                f"{p} is a bioimage.io package ({rdf.get('name', 'unnamed')!r}) but not one exported by "
                "napari-cpgcn (no config.napari_cpgcn section); only packages written by "
                "`napari-cpgcn export-bioimageio` can start a backbone")
        have_classes = list(ours.get("classes") or [])
        if classes is not None and have_classes != list(classes):
            extra = sorted(set(have_classes) - set(classes))[:3]
            lack = sorted(set(classes) - set(have_classes))[:3]
            raise PackageError(
                f"{p} was trained on another class set ({len(have_classes)} classes"
                + (f"; not ours: {extra}" if extra else "") + (f"; missing: {lack}" if lack else "")
                + f") than the {len(classes)} classes here; use a package of a napari-cpgcn run with the "
                "HPA classes")
        have_backbone = ours.get("backbone")
        if backbone is not None and have_backbone != backbone:
            raise PackageError(
                f"{p} holds a {have_backbone} backbone but the model here uses {backbone}: choose the "
                f"backbone {have_backbone} or export a package with a {backbone} backbone")
        weights = (rdf.get("weights") or {}).get("pytorch_state_dict") or {}
        member = str(weights.get("source", ""))
        if member not in z.namelist():
            raise PackageError(f"{p} lacks its pytorch_state_dict weights ({member or 'not described'}); "
                               "export it again with napari-cpgcn")
        data = z.read(member)
    want = weights.get("sha256")
    if want and hashlib.sha256(data).hexdigest() != want:
        raise PackageError(f"{p}: {member} does not match the SHA-256 in its description (modified or "
                           "truncated); export the package again")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise PackageError(f"{p}: {member} cannot be read as a state dict ({e})") from e
    if not isinstance(state, dict):
        raise PackageError(f"{p}: {member} is not a state dict")
    model_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    meta = {"kind": ours.get("kind"), "classes": have_classes, "backbone": have_backbone,
            "source": "bioimageio", "package": str(p)}
    return {"meta": meta, "model": model_state}

