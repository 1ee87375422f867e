"""Fusing the image-level and the cell-level predictions into one score per cell and class.

The paper's last step is the product ``C_final = C_image × C_cell`` (METHOD.md step 6). It is
right when both parts are good; when one is weak it drags the other down (measured:
docs/benchmarks.md, "Pretraining"). The Kaggle cell metric ranks the cells of each class on
their own, so what a fusion decides is, per class, how the two probabilities are traded
against each other. The options:

``product``    ``p_image × p_cell`` (the paper; the default, unchanged);
``image``      ``p_image`` given to every cell;
``cell``       ``p_cell``;
``geometric``  a weighted geometric mean ``p_image^w × p_cell^(1 - w)`` with one weight per
               class (``w = 0.5`` ranks like the product; 0 is the cell model, 1 the image model);
``logistic``   a per-class logistic regression on ``(logit p_image, logit p_cell)``: a
               calibrated, learned combination.

``geometric`` and ``logistic`` are learned by :func:`fit_fusion` from cells with known (or
pseudo-) labels; :func:`select_fusion` picks among the options by grouped cross-validation
(images never on both sides), so that the fused score is not worse than the better of its two
parts on cells the choice was not made on. The choice travels as :class:`FusionParams` (JSON,
saved next to a trained run).

Pure numpy (+ scikit-learn for the logistic fit); no torch, no Qt.

Examples
--------
>>> import numpy as np
>>> fuse(np.array([0.5, 0.2]), np.array([[0.4, 0.9]])).round(2)
array([[0.2 , 0.18]], dtype=float32)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_cpgcn.training.config import check_choice

__all__ = [
    "FUSION_METHODS",
    "LEARNED_METHODS",
    "FusionParams",
    "fuse",
    "fit_fusion",
    "select_fusion",
    "validation_cells",
    "mean_ap",
]

log = logging.getLogger(__name__)

#: Every fusion option, in the order :func:`select_fusion` prefers them on ties.
FUSION_METHODS: tuple[str, ...] = ("product", "geometric", "logistic", "cell", "image")
#: What :func:`select_fusion` chooses among by default: every option that uses the cell model.
#: ``image`` (the image probability given to every cell) is left out: the choice is scored
#: against the pseudo-labels, which are made from the image labels, so the image score agrees
#: with them by construction and wins the cross-validation while ranking no cell above another
#: (measured: bench_pretrain seed 1, random start — chosen "image", test cell mAP 0.21 against
#: 0.37 for the product). It can still be asked for (``fusion="image"``).
AUTO_CANDIDATES: tuple[str, ...] = tuple(m for m in FUSION_METHODS if m != "image")
#: The options whose parameters are fitted.
LEARNED_METHODS: tuple[str, ...] = ("geometric", "logistic")
_EPS = 1e-6


@dataclass
class FusionParams:
    """A fusion method and its fitted parameters.

    Attributes
    ----------
    method
        One of :data:`FUSION_METHODS`.
    weights
        ``geometric``: per-class weight ``w`` of the image part (length = number of classes).
    coef
        ``logistic``: per-class ``[a, b, c]`` of ``sigmoid(a·logit p_image + b·logit p_cell + c)``;
        a class without enough training cells keeps the product (``null`` row).
    info
        How it was chosen (fit set size, cross-validated scores of the candidates, ...).
    """

    method: str = "product"
    weights: list[float] | None = None
    coef: list[list[float] | None] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice(self.method, FUSION_METHODS, "fusion method", ValueError)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "weights": self.weights, "coef": self.coef, "info": self.info}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FusionParams:
        return cls(method=d.get("method", "product"), weights=d.get("weights"), coef=d.get("coef"),
                   info=dict(d.get("info") or {}))

    def save(self, path: str | Path) -> None:
        """Write as JSON atomically (e.g. ``RUN/fusion.json``)."""
        from napari_cpgcn.io.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, default=_json_default) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> FusionParams:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); delete it to fall back to the product") from e


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _broadcast(image_probs: np.ndarray, cell_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ip = np.asarray(image_probs, np.float32)
    cp = np.asarray(cell_probs, np.float32)
    if cp.ndim != 2:
        raise ValueError(f"cell_probs must be (n_cells, n_classes), got shape {cp.shape}")
    if ip.ndim == 1:
        ip = np.broadcast_to(ip[None, :], cp.shape)
    if ip.shape != cp.shape:
        raise ValueError(f"image_probs {ip.shape} do not fit cell_probs {cp.shape}: give (n_classes,) for one "
                         "image or (n_cells, n_classes) per cell")
    return ip, cp


def fuse(image_probs: np.ndarray, cell_probs: np.ndarray, method: str = "product",
         params: FusionParams | None = None) -> np.ndarray:
    """Fused per-cell scores ``(n_cells, n_classes)`` in [0, 1].

    Parameters
    ----------
    image_probs
        ``(n_classes,)`` image-level probabilities of one image, or ``(n_cells, n_classes)``
        (each cell's image's probabilities).
    cell_probs
        ``(n_cells, n_classes)`` cell-model probabilities.
    method
        One of :data:`FUSION_METHODS` (ignored when ``params`` is given: its method wins).
    params
        Fitted parameters (:func:`fit_fusion` / :func:`select_fusion`); needed by ``logistic``;
        ``geometric`` without them uses ``w = 0.5``.

    Returns
    -------
    numpy.ndarray
        float32 scores; ``product`` is exactly the paper's ``p_image × p_cell`` in float32.
    """
    if params is not None:
        method = params.method
    check_choice(method, FUSION_METHODS, "fusion method", ValueError)
    ip, cp = _broadcast(image_probs, cell_probs)
    if method == "product":
        return cp * ip
    if method == "image":
        return np.array(ip, dtype=np.float32)
    if method == "cell":
        return np.array(cp, dtype=np.float32)
    n_classes = cp.shape[1]
    if method == "geometric":
        w = np.full(n_classes, 0.5) if params is None or params.weights is None else np.asarray(params.weights, float)
        if w.shape != (n_classes,):
            raise ValueError(f"geometric fusion has {w.size} weights for {n_classes} classes")
        lp = w[None] * np.log(np.clip(ip, _EPS, 1.0)) + (1 - w[None]) * np.log(np.clip(cp, _EPS, 1.0))
        return np.exp(lp).astype(np.float32)
    # logistic
    if params is None or params.coef is None:
        raise ValueError("logistic fusion needs fitted parameters (fit_fusion(..., method='logistic'))")
    if len(params.coef) != n_classes:
        raise ValueError(f"logistic fusion has {len(params.coef)} coefficient rows for {n_classes} classes")
    out = cp * ip
    li, lc = _logit(ip), _logit(cp)
    for k, row in enumerate(params.coef):
        if row is None:  # too few training cells for this class: the product
            continue
        a, b, c = (float(v) for v in row)
        out[:, k] = (1.0 / (1.0 + np.exp(-(a * li[:, k] + b * lc[:, k] + c)))).astype(np.float32)
    return out


def _ap(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, s))


def mean_ap(targets: np.ndarray, scores: np.ndarray, min_positives: int = 1) -> float:
    """Mean over classes (with >= ``min_positives`` positive and one negative cell) of the AP."""
    t = np.asarray(targets) > 0.5
    aps = [_ap(t[:, k], scores[:, k]) for k in range(t.shape[1])
           if t[:, k].sum() >= min_positives and (~t[:, k]).any()]
    return float(np.mean(aps)) if aps else float("nan")


def fit_fusion(image_probs: np.ndarray, cell_probs: np.ndarray, targets: np.ndarray, method: str = "logistic",
               *, min_positives: int = 3, grid: Sequence[float] = tuple(np.linspace(0.0, 1.0, 11)),
               C: float = 1.0) -> FusionParams:
    """Learn a fusion from cells with known labels.

    Parameters
    ----------
    image_probs, cell_probs
        ``(n_cells, n_classes)`` probabilities of the two parts (``image_probs`` may be the
        cell's image's row repeated).
    targets
        ``(n_cells, n_classes)`` 0/1 cell labels: pseudo-labels of images neither model was
        trained on, or a truth where one exists.
    method
        ``"geometric"`` (per class, the weight of the grid with the best AP) or ``"logistic"``
        (per-class logistic regression on the two logits, L2 strength ``1/C``); a fixed method
        (``product``, ``image``, ``cell``) is returned as is.
    min_positives
        A class needs this many positive and negative cells to be fitted; otherwise it keeps
        the product (``geometric``: w = 0.5).

    Returns
    -------
    FusionParams
    """
    check_choice(method, FUSION_METHODS, "fusion method", ValueError)
    if method not in LEARNED_METHODS:
        return FusionParams(method)
    ip, cp = _broadcast(image_probs, cell_probs)
    t = np.asarray(targets) > 0.5
    if t.shape != cp.shape:
        raise ValueError(f"targets {t.shape} do not fit the probabilities {cp.shape}")
    n_classes = cp.shape[1]
    fitted = [bool(t[:, k].sum() >= min_positives and (~t[:, k]).sum() >= min_positives) for k in range(n_classes)]
    info = {"n_cells": int(len(cp)), "fitted_classes": int(sum(fitted)), "min_positives": int(min_positives)}
    if method == "geometric":
        weights = []
        li, lc = np.log(np.clip(ip, _EPS, 1.0)), np.log(np.clip(cp, _EPS, 1.0))
        for k in range(n_classes):
            if not fitted[k]:
                weights.append(0.5)
                continue
            # the best AP; among equal ones the weight closest to the product's 0.5
            scores = [(_ap(t[:, k], w * li[:, k] + (1 - w) * lc[:, k]), -abs(w - 0.5), float(w)) for w in grid]
            weights.append(max(scores)[2])
        return FusionParams("geometric", weights=[round(w, 4) for w in weights], info=info)
    from sklearn.linear_model import LogisticRegression

    li, lc = _logit(ip), _logit(cp)
    coef: list[list[float] | None] = []
    for k in range(n_classes):
        if not fitted[k]:
            coef.append(None)
            continue
        x = np.stack([li[:, k], lc[:, k]], axis=1)
        clf = LogisticRegression(C=C, max_iter=1000).fit(x, t[:, k].astype(int))
        coef.append([round(float(clf.coef_[0, 0]), 6), round(float(clf.coef_[0, 1]), 6),
                     round(float(clf.intercept_[0]), 6)])
    return FusionParams("logistic", coef=coef, info=info)


def select_fusion(image_probs: np.ndarray, cell_probs: np.ndarray, targets: np.ndarray, groups: Sequence,
                  candidates: Sequence[str] = AUTO_CANDIDATES, *, folds: int = 3, min_positives: int = 3,
                  margin: float = 0.0) -> FusionParams:
    """Choose the fusion by grouped cross-validation and fit it on all the cells.

    Every candidate is scored by the mean AP (:func:`mean_ap`) of the cells of held-out groups
    (images), the learned ones fitted on the other folds; the best is refitted on everything.
    The product wins unless another candidate beats it by more than ``margin``; with too few
    groups for cross-validation the product is kept.

    Parameters
    ----------
    image_probs, cell_probs, targets
        As :func:`fit_fusion`.
    groups
        ``(n_cells,)`` image id of each cell (cells of one image stay in one fold).
    candidates
        Methods to try (default :data:`AUTO_CANDIDATES`: all but ``image``).
    folds
        Number of folds (at most the number of images).

    Returns
    -------
    FusionParams
        ``info["cv_mAP"]`` holds every candidate's cross-validated score.
    """
    ip, cp = _broadcast(image_probs, cell_probs)
    t = np.asarray(targets) > 0.5
    g = np.asarray([str(v) for v in groups])
    if len(g) != len(cp):
        raise ValueError(f"{len(g)} groups for {len(cp)} cells")
    uniq = sorted(set(g.tolist()))
    k = min(int(folds), len(uniq))
    if k < 2:
        log.info("fusion: fewer than two images to choose on; keeping the product")
        return FusionParams("product", info={"reason": "fewer than two images to cross-validate on",
                                             "n_cells": int(len(cp))})
    # A stable assignment of images to folds (by sorted id, round robin).
    fold_of = {iid: i % k for i, iid in enumerate(uniq)}
    fold = np.array([fold_of[v] for v in g])
    scores: dict[str, float] = {}
    for m in candidates:
        pred = np.zeros_like(cp)
        for f in range(k):
            te, tr = fold == f, fold != f
            params = fit_fusion(ip[tr], cp[tr], t[tr], m, min_positives=min_positives)
            pred[te] = fuse(ip[te], cp[te], params=params)
        scores[m] = mean_ap(t, pred)
    finite = {m: s for m, s in scores.items() if np.isfinite(s)}
    best = "product"
    if finite:
        top = max(finite, key=lambda m: (finite[m], -list(candidates).index(m)))
        if "product" not in finite or finite[top] > finite["product"] + margin:
            best = top
    params = fit_fusion(ip, cp, t, best, min_positives=min_positives)
    params.info.update({"cv_mAP": {m: round(float(s), 4) for m, s in scores.items()}, "folds": k,
                        "n_images": len(uniq), "n_cells": int(len(cp)), "chosen": best})
    log.info("fusion: %s chosen (cross-validated mAP %s)", best,
             ", ".join(f"{m} {s:.3f}" for m, s in scores.items()))
    return params


def validation_cells(predictor, run_dir: str | Path, data_dir: str | Path,
                     image_ids: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """The cells a trained run can choose its fusion on: ``(image_probs, cell_probs, targets, groups)``.

    The images are the image model's validation split (``RUN/image_model/split.json``: held
    out from the image model and its refinement), their cells the run's segmentation
    (``RUN/segmentation/{ID}.tif``) and the targets their pseudo-labels
    (``RUN/pseudolabels.csv``) — the only cell-level labels a run has. The cell model splits
    its images the same way (:func:`napari_cpgcn.training.cell_trainer.split_by_image`), so
    with the same ``val_fraction`` (the default) neither model was trained on these cells.

    Parameters
    ----------
    predictor
        A :class:`napari_cpgcn.pipeline.Predictor` of the run.
    run_dir
        The trained run folder.
    data_dir
        Its training images.
    image_ids
        Images to use instead of the validation split.
    """
    from napari_cpgcn.classes import SHORT_NAMES
    from napari_cpgcn.io.hpa import read_image
    from napari_cpgcn.io.masks import find_mask, read_mask
    from napari_cpgcn.training.pseudolabels import pseudo_label_matrix, read_pseudolabels

    run = Path(run_dir)
    if image_ids is None:
        split = run / "image_model" / "split.json"
        if not split.is_file():
            raise FileNotFoundError(f"{split} does not exist: the run has no recorded validation split")
        image_ids = json.loads(split.read_text())["val"]
    pl = read_pseudolabels(run / "pseudolabels.csv")
    cols_i = [f"image_{s}" for s in SHORT_NAMES]
    cols_c = [f"cell_{s}" for s in SHORT_NAMES]
    ips, cps, ys, groups = [], [], [], []
    for iid in image_ids:
        mask = find_mask(run / "segmentation", iid)
        if mask is None:
            log.warning("fusion: no cells of %s in %s; skipped", iid, run / "segmentation")
            continue
        table = predictor.predict(read_image(data_dir, image_id=iid), cells=read_mask(mask),
                                  with_cams=False).table
        sub = pl[pl.image_id == iid][["cell_id", "labels"]]
        rows = table[["cell_id"]].merge(sub, on="cell_id", how="left").fillna({"labels": ""})
        ips.append(table[cols_i].to_numpy(np.float32))
        cps.append(table[cols_c].to_numpy(np.float32))
        ys.append(pseudo_label_matrix(rows))
        groups += [str(iid)] * len(table)
    n = len(SHORT_NAMES)
    if not ips:
        return (np.zeros((0, n), np.float32), np.zeros((0, n), np.float32), np.zeros((0, n), np.uint8), [])
    return np.concatenate(ips), np.concatenate(cps), np.concatenate(ys), groups
