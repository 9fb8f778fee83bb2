"""`medfm predict`: raw files reach the model exactly as their prepared twins (same case ids, same
probabilities); prepared datasets; bad files skipped and listed; no source names in the output; resume
after an interruption gives the uninterrupted table; encoders give embeddings; CLI round trip, one-line
errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medfm.cli.app import app
from medfm.data.prepare import PrepareConfig, prepare
from medfm.errors import InputError, MedfmError
from medfm.predict import predict
from medfm.tasks.adapt import fit_classifier, predict_store
from medfm.tasks.adapt.classifier import load_classifier
from test_adapt import make_prepared  # tests/ is on sys.path (pytest rootdir import mode)

NAME = "Doe_Janetta"


def _encoder():
    from medfm.models.registry import create_encoder

    torch.manual_seed(0)
    return create_encoder("vit_tiny", img_size=16, patch_size=4, depth=1, embed_dim=16, num_heads=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """PNG files in a folder named after a patient (file names too), a labelled manifest, the store prepared
    from it, and a classifier trained on that store."""
    root = tmp_path_factory.mktemp("predict")
    src = root / f"{NAME}_MRN12345"
    src.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        img = (rng.random((16, 16)) * 80).astype(np.uint8)
        y = i % 2
        if y:
            img[3:8, 3:8] = 250
        name = f"{NAME}_{i:03d}.png"
        Image.fromarray(img).save(src / name)
        rows.append({"image": name, "label": y})
    pd.DataFrame(rows).to_csv(src / "manifest.csv", index=False)
    salt = root / "salt" / "salt.txt"
    store = root / "store"
    prepare(src, store, PrepareConfig(size=16, labels=["label"], salt_file=str(salt)), progress=False)
    fit_classifier(_encoder(), store, root / "clf", method="linear")
    return {"root": root, "src": src, "store": store, "clf": root / "clf", "salt": str(salt)}


def _run(world, inputs, out, **kw):
    kw.setdefault("salt_file", world["salt"])
    return predict(world["clf"], inputs, out, progress=False, **kw)


def _table(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "predictions.parquet")


def _all_text(out: Path) -> str:
    return "\n".join(f.read_bytes().decode("latin-1") for f in out.rglob("*") if f.is_file())


def test_raw_files_predict_like_their_prepared_twins(world, tmp_path):
    raw, prep = tmp_path / "raw", tmp_path / "prep"
    res = _run(world, [world["src"]], raw)
    _run(world, [world["store"]], prep)
    a, b = _table(raw), _table(prep)
    assert res["n_cases"] == len(a) == len(b) == 40 and res["n_skipped"] == 0
    # same salt, same case ids as prepare gave the same files
    m = a.merge(b, on="case_id", suffixes=("_raw", "_prep"))
    assert len(m) == 40
    np.testing.assert_allclose(m["prob_raw"], m["prob_prep"], atol=1e-5)
    assert (m["pred_raw"] == m["pred_prep"]).all()
    # the store's predictions equal the classifier's own predict_store, threshold included
    ref = predict_store(load_classifier(world["clf"]), world["store"]).set_index("case_id")
    np.testing.assert_allclose(b.set_index("case_id").loc[ref.index, "prob"], ref["prob"], atol=1e-6)
    assert (b.set_index("case_id").loc[ref.index, "pred"] == ref["pred"]).all()
    # single files: the same ids and probabilities as in their folder
    files = sorted(world["src"].glob("*.png"))[:3]
    _run(world, files, tmp_path / "files")
    one = _table(tmp_path / "files").set_index("case_id")
    assert len(one) == 3
    np.testing.assert_allclose(one["prob"], a.set_index("case_id").loc[one.index, "prob"], atol=1e-5)
    conf = json.loads((raw / "config.json").read_text())
    assert conf["kind"] == "predictions" and conf["preprocessing"]["size"] == 16
    metrics = json.loads((raw / "metrics.json").read_text())
    assert metrics["images_per_s"] > 0 and metrics["n_predicted_now"] == 40
    assert not (raw / "partial").exists()


def test_bad_files_are_listed_and_the_rest_predicted(world, tmp_path):
    folder = tmp_path / f"{NAME}_scans"
    folder.mkdir()
    good = sorted(world["src"].glob("*.png"))[:5]
    for f in good:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / f"{NAME}_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # truncated PNG
    (folder / f"{NAME}_empty.png").write_bytes(b"")
    out = tmp_path / "out"
    res = _run(world, [folder], out)
    assert res["n_cases"] == 5 and len(_table(out)) == 5
    skipped = json.loads((out / "skipped.json").read_text())
    assert len(skipped) == 2 and res["n_skipped"] == 2
    assert all(e["error"] and "\n" not in e["error"] and e["case_id"].startswith("c_") for e in skipped)
    text = _all_text(out)
    assert NAME not in text and "MRN12345" not in text and "scans" not in text
    # the private map beside the salt leads back to the files
    maps = json.loads((out / "config.json").read_text())["case_maps"]
    back = json.loads((Path(world["salt"]).parent / maps[0]).read_text())["cases"]
    assert {Path(v["image"]).name for v in back.values()} >= {f.name for f in good}


def test_no_source_names_without_keep_identifiers(world, tmp_path):
    out, kept = tmp_path / "out", tmp_path / "kept"
    _run(world, [world["src"], sorted(world["src"].glob("*.png"))[0]], out)
    assert NAME not in _all_text(out) and "MRN" not in _all_text(out)
    _run(world, [world["src"]], kept, keep_identifiers=True)
    t = _table(kept)
    assert t["case_id"].str.startswith(NAME).all() and NAME in t["source"].iloc[0]


def test_resume_after_an_interrupted_run_gives_the_same_table(world, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _run(world, [world["src"]], full, batch_size=8)
    with pytest.raises(RuntimeError, match="fail_after_batches"):
        _run(world, [world["src"]], part, batch_size=8, fail_after_batches=2)
    assert len(list((part / "partial").glob("batch-*.json"))) == 2
    res = _run(world, [world["src"]], part, batch_size=8)
    assert res["n_predicted_now"] == 40 - 16
    pd.testing.assert_frame_equal(_table(full), _table(part))


def test_encoder_runs_give_embeddings(world, tmp_path):
    from medfm.models.io import load_encoder, save_encoder

    save_encoder(_encoder(), tmp_path / "enc")
    out = tmp_path / "out"
    predict(tmp_path / "enc", [world["store"]], out, progress=False)
    emb, t = np.load(out / "embeddings.npy"), _table(out)
    assert emb.shape == (40, 16) and (t["row"] == np.arange(40)).all()
    from medfm.data.store import PreparedDataset

    ds = PreparedDataset(world["store"])
    enc = load_encoder(tmp_path / "enc").eval()
    with torch.no_grad():
        want = enc(ds[0]["image"][None]).numpy()
    np.testing.assert_allclose(emb[0], want[0], atol=1e-5)


def test_multilabel_prepared_dataset_has_prob_and_pred_per_label(tmp_path):
    data = make_prepared(tmp_path / "data", n=40, task="multilabel")
    clf = fit_classifier(_encoder(), data, tmp_path / "clf", method="linear")
    out = tmp_path / "out"
    predict(tmp_path / "clf", [data], out, progress=False)
    t, ref = _table(out), predict_store(clf, data)
    for c in clf.classes:
        np.testing.assert_allclose(t[f"prob_{c}"], ref[f"prob_{c}"], atol=1e-6)
        assert set(t[f"pred_{c}"]) <= {0, 1}


def test_exported_model_predicts_like_its_run(world, tmp_path):
    pytest.importorskip("onnxruntime")
    export = pytest.importorskip("medfm.export.run")
    export.export_run(world["clf"], tmp_path / "exp", int8=False)
    a, b = tmp_path / "a", tmp_path / "b"
    predict(tmp_path / "exp", [world["src"]], a, progress=False, salt_file=world["salt"])
    _run(world, [world["src"]], b)
    np.testing.assert_allclose(_table(a)["prob"], _table(b)["prob"], atol=1e-4)
    assert json.loads((a / "config.json").read_text())["model_kind"] == "export"


def test_cli_round_trip_and_one_line_errors(world, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["predict", str(world["clf"]), str(world["src"]), "--out", str(out),
                                 "--batch-size", "16", "--salt-file", world["salt"], "--threads", "1"],
                           env={"MEDFM_PROGRESS": "0"})
    assert r.exit_code == 0, r.output
    assert "images/s" in r.output and (out / "predictions.csv").is_file()
    assert len(pd.read_csv(out / "predictions.csv")) == 40
    for model, inputs in ((world["src"], world["src"]), (world["clf"], tmp_path / "nope")):
        r = CliRunner().invoke(app, ["predict", str(model), str(inputs), "--out", str(tmp_path / "o")])
        assert r.exit_code != 0
        assert isinstance(r.exception, MedfmError) and "\n" not in str(r.exception)
    with pytest.raises(InputError, match="batch-size"):
        _run(world, [world["src"]], tmp_path / "o", batch_size=0)
    with pytest.raises(InputError, match="given twice"):
        _run(world, [world["src"], world["src"]], tmp_path / "o")
