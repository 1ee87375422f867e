"""A run's model card: what a trained run is, read from its folder (no Qt, no torch).

Shown in the Predict widget and written next to every export, so that a prediction never
travels without the model that made it: the run folder, the training data (folder, number of
images, classes seen), the backbone, how it started (random / self-supervised / ImageNet /
fine-tuned from a run), the best validation mAP, and warnings a user must see (a model
trained on synthetic data, a low or missing validation mAP).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from napari_cpgcn.classes import CLASS_NAMES

log = logging.getLogger(__name__)

__all__ = ["ModelCard", "model_card", "write_training_data_record", "LOW_MAP", "TRAINING_DATA_JSON"]

#: Below this best validation mAP (image level) the card warns that the model is weak.
LOW_MAP = 0.3
#: Written into the run folder by the Train widget: where the training images and labels were.
TRAINING_DATA_JSON = "training_data.json"


@dataclass
class ModelCard:
    """What a run is; :meth:`text` is the one-paragraph form, :meth:`to_dict` the exported one."""

    run: str
    data_folder: str | None = None
    labels_csv: str | None = None
    n_images: int | None = None
    classes_seen: list[str] = field(default_factory=list)
    backbone: str | None = None
    start: str = "unknown"
    val_map: float | None = None
    synthetic: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        """Plain lines: run, data, backbone and start, validation mAP, then the warnings."""
        data = self.data_folder or "not recorded"
        n = "?" if self.n_images is None else str(self.n_images)
        mAP = "not recorded" if self.val_map is None else f"{self.val_map:.3f}"
        lines = [f"Run: {self.run}",
                 f"Trained on: {data} ({n} images, {len(self.classes_seen)} classes seen)",
                 f"Backbone: {self.backbone or '?'}; start: {self.start}",
                 f"Validation mAP (image): {mAP}"]
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def write_training_data_record(run: str | Path, data_dir: str | Path, labels_csv: str | Path) -> Path:
    """Record in ``run`` where its training images and labels are (read back by :func:`model_card`)."""
    from napari_cpgcn.io.atomic import atomic_write_text

    record = {"data_folder": str(Path(data_dir).resolve()), "labels_csv": str(Path(labels_csv).resolve())}
    Path(run).mkdir(parents=True, exist_ok=True)
    return atomic_write_text(Path(run) / TRAINING_DATA_JSON, json.dumps(record, indent=1) + "\n")


def _best_val_map(history: Path) -> float | None:
    try:
        with history.open(newline="", encoding="utf-8") as fh:
            values = [float(r["val_mAP"]) for r in csv.DictReader(fh) if r.get("val_mAP") not in (None, "")]
    except (OSError, ValueError, KeyError):
        return None
    values = [v for v in values if math.isfinite(v)]
    return max(values) if values else None


def _labels(run: Path, labels_csv: str | None) -> tuple[list[str], set[int]]:
    """Image ids and the class ids present: the run's own copy of the labels, else the recorded CSV."""
    from napari_cpgcn.io.tables import read_labels_csv

    for path in (run / "refine" / "labels.csv", Path(labels_csv) if labels_csv else None):
        if path is not None and path.is_file():
            try:
                table = read_labels_csv(path)
            except (OSError, ValueError) as e:
                log.warning("model card: could not read %s: %s", path, e)
                continue
            ids = list(table.ids)
            seen = {int(k) for k in table.labels.any(axis=0).nonzero()[0]}  # multi-hot (N, 19)
            return ids, seen
    return [], set()


def _start(config: dict[str, Any], run: Path) -> str:
    image = config.get("image") or {}
    init = image.get("init_from")
    if config.get("pretrain"):
        return "self-supervised pretraining (pretrain stage of this run)"
    if init:
        src = Path(init)
        if (src / "pretrain").is_dir() and not (src / "image_model").is_dir() or src.name == "pretrain":
            return f"self-supervised backbone from {src}"
        return f"fine-tuned from {src}"
    if image.get("imagenet_weights"):
        return "ImageNet weights"
    return "random initialisation"


def model_card(run_dir: str | Path) -> ModelCard:
    """Read the card of a trained run folder (missing facts are left unknown, never guessed).

    Raises
    ------
    FileNotFoundError
        ``run_dir`` has no ``config.json`` (not a napari-cpgcn run).
    """
    run = Path(run_dir)
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run} has no config.json: not a trained napari-cpgcn run")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}); retrain or restore the run's config.json") from e
    record: dict[str, Any] = {}
    if (run / TRAINING_DATA_JSON).is_file():
        try:
            record = json.loads((run / TRAINING_DATA_JSON).read_text(encoding="utf-8"))
        except ValueError:
            record = {}
    ids, seen = _labels(run, record.get("labels_csv"))
    folder = record.get("data_folder")
    synthetic = bool(ids) and all(str(i).startswith("synth-") for i in ids)
    if folder:
        f = Path(folder)
        synthetic = synthetic or (f / "synth.json").is_file() or (f.parent / "synth.json").is_file()
    card = ModelCard(
        run=str(run.resolve()),
        data_folder=folder,
        labels_csv=record.get("labels_csv"),
        n_images=len(ids) if ids else None,
        classes_seen=[CLASS_NAMES[k] for k in sorted(seen) if 0 <= k < len(CLASS_NAMES)],
        backbone=(config.get("image") or {}).get("backbone"),
        start=_start(config, run),
        val_map=_best_val_map(run / "image_model" / "history.csv"),
        synthetic=synthetic,
    )
    if synthetic:
        card.warnings.append("trained on synthetic images (napari_cpgcn.synth): its predictions on real "
                             "HPA images are not meaningful")
    if card.val_map is None:
        card.warnings.append("no validation mAP recorded: nothing says how well this model does")
    elif card.val_map < LOW_MAP:
        card.warnings.append(f"low validation mAP ({card.val_map:.2f} < {LOW_MAP}): treat its scores as unreliable")
    return card
