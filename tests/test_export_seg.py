"""Segmenter export and mask prediction: ONNX fp32 parity (2D and 3D), int8 variants with test-split Dice
recorded, `medfm predict` masks aligned with the inputs (2D PNG at the original H x W, 3D NIfTI with the
source affine), one row per case, no file names in the outputs."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medfm.export import export_run, load_exported
from medfm.predict import predict
from medfm.tasks.segment.runs import load_segmentation_run
from medfm.tasks.segment.train import SegTrainConfig, train_segmentation
from segdata import disk_dataset  # tests/ is on sys.path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("segx")
    out = {}
    for dims in (2, 3):
        data = root / f"data{dims}"
        data.mkdir()
        disk_dataset(data, n=6 if dims == 3 else 12, three_d=dims == 3)
        cfg = SegTrainConfig(data=str(data), decoder="monai_unet", img_size=32, steps=6, batch_size=2,
                             progress=False, patch=[16, 16, 16] if dims == 3 else None)
        run = train_segmentation(cfg, root / f"run{dims}")
        conf = export_run(run, root / f"x{dims}", calib_store=str(data), n_calib=8)
        out[dims] = {"data": data, "run": run, "x": root / f"x{dims}", "conf": conf}
    return out


@pytest.mark.parametrize("dims", [2, 3])
def test_fp32_parity_and_int8_dice_recorded(world, dims):
    w = world[dims]
    conf = w["conf"]
    shape = [1, 32, 32] if dims == 2 else [1, 16, 16, 16]
    assert conf["source_kind"] == "segmenter" and conf["input_shape"] == shape
    assert conf["num_classes"] == 2 and len(conf["classes"]) == 1 and conf["output"] == "logits"
    assert conf["inference"]["mode"] == ("whole_image" if dims == 2 else "sliding_window")
    assert set(conf["files"]) == {"fp32", "int8", "int8_static"}
    model, _ = load_segmentation_run(w["run"])
    m = load_exported(w["x"], threads=1)
    for b in (1, 3):
        x = np.random.default_rng(b).random((b, *shape), dtype=np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        got = m.run(x)
        assert got.shape == (b, 2, *shape[1:]) and np.abs(got - want).max() <= 1e-4
    v = conf["variants"]
    assert max(v["fp32"]["max_abs_diff"].values()) <= 1e-4
    for name in ("fp32", "int8", "int8_static"):
        d = v[name]["test_dice"]
        assert 0.0 <= d["mean"] <= 1.0 and name in v and "mean" in v[name]["test_dice_delta"]
    assert v["fp32"]["test_dice"] == v["torch"]["test_dice"]
    assert "test Dice" in (w["x"] / "README.md").read_text()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("which", ["run", "x"])
def test_predict_writes_masks_on_the_input_grid(world, tmp_path, dims, which):
    w = world[dims]
    data = w["data"]
    inputs = [data]
    files = sorted(p.name for p in data.iterdir() if p.name.startswith("im"))
    if dims == 2:  # one more input, non-square and of another size: its mask comes back at its own H x W
        (tmp_path / "more").mkdir()
        Image.fromarray((np.random.default_rng(0).random((40, 28)) * 255).astype(np.uint8)).save(
            tmp_path / "more" / "odd.png")
        inputs.append(tmp_path / "more" / "odd.png")
        files.append("odd.png")
    out = tmp_path / "pred"
    salt = tmp_path / "salt.txt"
    res = predict(w[which], inputs, out, batch_size=4, progress=False, salt_file=str(salt))
    df = pd.read_csv(out / "predictions.csv")
    assert res["n_cases"] == len(df) == len(files) and len(set(df["case_id"])) == len(df)
    frac = [c for c in df.columns if c.startswith("fraction_")]
    assert len(frac) == 1 and df[frac[0]].between(0, 1).all()
    for _, row in df.iterrows():
        assert (out / row["mask"]).is_file() and row["case_id"] in row["mask"]
    if dims == 2:
        shapes = {np.asarray(Image.open(out / r)).shape for r in df["mask"]}
        assert shapes == {(32, 32), (40, 28)}
    else:
        assert any(c.startswith("volume_ml_") for c in df.columns)
        src = nib.load(str(data / "im0.nii.gz"))
        for r in df["mask"]:
            m = nib.load(str(out / r))
            assert m.shape == src.shape and np.allclose(m.affine, src.affine)
    text = "\n".join(p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file()
                     and p.suffix in (".csv", ".json"))
    names = [p.name for p in out.rglob("*")]
    for f in files:  # no input file name in the tables, configs or mask names
        stem = f.split(".")[0]
        assert f not in text and not any(n.startswith(stem + ".") for n in names)
