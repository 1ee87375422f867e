"""napari-cpgcn finetune: the cell model learns from corrected cells and RUN2 is a complete run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_cpgcn.classes import SHORT_NAMES
from napari_cpgcn.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def predicted(tiny_trained, tiny_data, tmp_path_factory):
    from napari_cpgcn.batch import BatchOptions, run_predict_folder

    run, _ = tiny_trained
    out = tmp_path_factory.mktemp("ft") / "pred"
    ids = sorted(p.name[:-len("_green.png")] for p in (tiny_data / "images").glob("*_green.png"))[:2]
    run_predict_folder(tiny_data / "images", run, out, BatchOptions(batch_size=1, workers=1, device="cpu"),
                       image_ids=ids)
    return out


def _cell_probs(run, tiny_data, pred_dir, image_id):
    from napari_cpgcn.io.hpa import read_image
    from napari_cpgcn.io.masks import read_mask
    from napari_cpgcn.pipeline.predictor import CPGCNPredictor

    p = CPGCNPredictor.from_run(run, device="cpu")
    out = p.predict(read_image(tiny_data / "images", image_id=image_id),
                    cells=read_mask(pred_dir / "masks" / f"{image_id}.tif"), with_cams=False)
    return out.table.set_index("cell_id")


def test_finetune_moves_a_corrected_cell_toward_its_correction(tiny_trained, tiny_data, predicted, tmp_path):
    import pandas as pd
    import torch

    from napari_cpgcn.pipeline.predictor import load_predictor
    from napari_cpgcn.review.corrections import CorrectionStore

    run, _ = tiny_trained
    cells = pd.read_csv(predicted / "cells.csv", dtype={"image_id": str})
    row = cells.iloc[0]
    iid, cid = row.image_id, int(row.cell_id)
    probs = row[[f"cell_{s}" for s in SHORT_NAMES[:-1]]].to_numpy(float)
    target = int(np.argmin(probs))                 # the class the model believes least
    store = CorrectionStore(predicted, who="test")
    store.add(iid, cid, [target])
    before = _cell_probs(run, tiny_data, predicted, iid)
    run2 = tmp_path / "run2"
    assert main(["finetune", str(run), "--corrections", str(predicted), "--out", str(run2), "--epochs", "3",
                 "--weight", "30", "--lr", "3e-3", "--device", "cpu"]) == 0
    after = _cell_probs(run2, tiny_data, predicted, iid)
    col = f"cell_{SHORT_NAMES[target]}"
    assert after.loc[cid, col] > before.loc[cid, col] + 0.02, (before.loc[cid, col], after.loc[cid, col])
    # the cell model changed, the image model did not
    a = torch.load(run / "cell_model" / "best.pt", weights_only=True, map_location="cpu")["model"]
    b = torch.load(run2 / "cell_model" / "best.pt", weights_only=True, map_location="cpu")["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].dtype.is_floating_point)
    np.testing.assert_allclose(after["image_" + SHORT_NAMES[0]], before["image_" + SHORT_NAMES[0]], rtol=1e-6)
    # RUN2 is a run like any other, with its provenance; RUN is untouched
    pred2 = load_predictor(run2, device="cpu")
    assert pred2.run_dir == run2.resolve() or pred2.run_dir == run2
    meta = json.loads((run2 / "finetune.json").read_text())
    assert meta["n_corrected_cells"] == 1 and meta["source_run"] == str(run.resolve())
    assert not (run / "finetune.json").exists()
    # a second finetune into the same folder is refused
    assert main(["finetune", str(run), "--corrections", str(predicted), "--out", str(run2)]) == 1


def test_finetune_errors_name_the_problem(tiny_trained, predicted, tmp_path):
    from napari_cpgcn.review.finetune import FinetuneOptions, run_finetune

    run, _ = tiny_trained
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_finetune(run, tmp_path / "nope", tmp_path / "r2")
    empty = tmp_path / "pred_empty"
    (empty / "masks").mkdir(parents=True)
    (empty / "run.json").write_text(json.dumps({"settings": {"input_dir": str(tmp_path)}}))
    with pytest.raises(ValueError, match="holds no corrections"):
        run_finetune(run, empty, tmp_path / "r3", FinetuneOptions(epochs=1, device="cpu"))
    with pytest.raises(ValueError, match="is the run being fine-tuned"):
        run_finetune(run, predicted, run)
