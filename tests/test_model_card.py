"""The model card (pipeline.model_card) and the per-cell rows after a mask edit (_napari.layers), without a viewer."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from napari_cpgcn._napari.layers import EDITED_COLUMN, paint_atom_ids, sync_features_to_mask
from napari_cpgcn.pipeline.model_card import LOW_MAP, model_card, write_training_data_record


def _run(tmp_path, history: str | None, image: dict, ids=("a", "b"), labels=("0|2", "2")):
    run = tmp_path / "run"
    (run / "image_model").mkdir(parents=True)
    (run / "refine").mkdir()
    (run / "config.json").write_text(json.dumps({"image": image}))
    (run / "refine" / "labels.csv").write_text("ID,Label\n" + "".join(f"{i},{lab}\n" for i, lab in zip(ids, labels, strict=True)))
    if history is not None:
        (run / "image_model" / "history.csv").write_text(history)
    return run


def test_card_of_a_weak_fine_tuned_real_data_run(tmp_path):
    run = _run(tmp_path, "epoch,train_loss,val_mAP\n1,0.9,0.12\n2,0.8,0.21\n3,0.7,nan\n",
               {"backbone": "resnet50", "init_from": str(tmp_path / "older")})
    (tmp_path / "data").mkdir()
    write_training_data_record(run, tmp_path / "data", tmp_path / "data" / "train.csv")
    card = model_card(run)
    assert card.val_map == pytest.approx(0.21) and card.n_images == 2 and not card.synthetic
    assert card.classes_seen == ["Nucleoplasm", "Nucleoli"] and card.backbone == "resnet50"
    assert card.start == f"fine-tuned from {tmp_path / 'older'}" and card.data_folder == str((tmp_path / "data").resolve())
    assert len(card.warnings) == 1 and f"< {LOW_MAP}" in card.warnings[0]
    assert "WARNING: low validation mAP" in card.text() and "2 images, 2 classes seen" in card.text()


def test_card_warns_for_synthetic_data_and_missing_map(tmp_path):
    card = model_card(_run(tmp_path, None, {"backbone": "resnet18", "imagenet_weights": "x.pt"},
                           ids=("synth-0-00000-aa", "synth-0-00001-bb")))
    assert card.synthetic and card.val_map is None and card.start == "ImageNet weights"
    assert any("synthetic" in w for w in card.warnings) and any("no validation mAP" in w for w in card.warnings)


def test_card_of_a_folder_that_is_no_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        model_card(tmp_path)


def test_rows_follow_the_mask_after_an_edit():
    mask = np.zeros((20, 20), np.int32)
    mask[:5, :5], mask[10:15, 10:15] = 1, 2
    feats = pd.DataFrame({"index": [1, 2], "area": [25, 25], "centroid_y": [2.0, 12.0], "centroid_x": [2.0, 12.0],
                          "top_class": ["golgi", "nucleoli"], "fused_golgi": [0.9, 0.1]})
    old = mask.copy()
    mask[mask == 1] = 0  # erase 1
    mask[12:14, 12:18] = 7  # paint 7 over part of 2
    touched = paint_atom_ids([(np.nonzero(mask != old), old[mask != old], mask[mask != old])])
    assert touched == {1, 2, 7}
    out, removed, added = sync_features_to_mask(feats, mask, touched)
    assert removed == [1] and added == [7]
    rows = out.set_index("index")
    assert list(rows.index) == [2, 7] and bool(rows.loc[2, EDITED_COLUMN]) and bool(rows.loc[7, EDITED_COLUMN])
    assert rows.loc[7, "area"] == 12 and np.isnan(rows.loc[7, "fused_golgi"])
    assert rows.loc[7, "top_class"] == "new cell: re-predict" and rows.loc[2, "top_class"] == "nucleoli"
    full, removed, added = sync_features_to_mask(feats, mask, None)  # a replaced mask: every id checked
    assert removed == [1] and added == [7]
