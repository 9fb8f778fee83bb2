"""Vision-language tasks on a tiny trained run: zero-shot, retrieval + FAISS index, reports (plain, RAG), VQA,
and the CLI commands end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medfm.cli.app import app
from medfm.data.pairs import ImageTextDataset
from medfm.errors import ConfigError, InputError
from medfm.models.text import save_tiny_bert
from medfm.tasks.vlm.data import write_toy_pairs
from medfm.tasks.vlm.prompts import (
    attribute_prompts,
    corpus_prompts,
    default_prompts,
    load_prompts,
    select_prompts,
)
from medfm.tasks.vlm.rag import compose_report, nearest_reports, rag_reports
from medfm.tasks.vlm.retrieval import CaseIndex, embed_dataset, recall_at_k, retrieval_metrics
from medfm.tasks.vlm.vqa import ClosedVQA, evaluate_vqa, load_vqa_json, parse_question, phantom_questions
from medfm.tasks.vlm.zeroshot import auroc_per_class, evaluate_zeroshot, select_on_split, zeroshot_probs
from medfm.train.clip import ClipConfig, load_clip, train_clip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with all three objectives, trained a few epochs on a toy image-report set."""
    root = tmp_path_factory.mktemp("vlm")
    bert = save_tiny_bert(root / "bert")
    data = write_toy_pairs(root / "toy", n=32, size=32)
    cfg = ClipConfig(
        data=str(data),
        out=str(root / "run"),
        text_tower=str(bert),
        img_size=32,
        encoder_kwargs={"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2},
        lock_text=-1,
        fusion_dim=32,
        decoder_dim=32,
        decoder_depth=1,
        w_itm=0.5,
        w_caption=0.5,
        batch_size=8,
        epochs=3,
        augment=False,
        lr=2e-3,
        text_lr=1e-3,
    )
    run = train_clip(cfg, progress=False)
    return {"run": run, "data": data, "model": load_clip(run), "root": root}


def test_dataset_reads_prepared_and_manifest(trained, tmp_path):
    ds = ImageTextDataset(trained["data"], split="test", img_size=16)
    assert len(ds) == 8 and ds.label_names == ["effusion", "nodule"]
    it = ds[0]
    assert it["image"].shape == (1, 16, 16) and "FINDINGS" in it["text"] and it["label"].shape == (2,)
    # The same pairs through a CSV manifest of PNG files.
    from PIL import Image

    rows = []
    for i in range(3):
        arr = (ds.image(i)[0].numpy() * 255).astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        rows.append(f'{i}.png,"{ds.texts[i]}",{int(ds.labels()[i, 0])}')
    (tmp_path / "m.csv").write_text("image,report,effusion\n" + "\n".join(rows) + "\n")
    csv = ImageTextDataset(tmp_path / "m.csv", img_size=16, label_columns=["effusion"])
    assert len(csv) == 3 and csv.texts == ds.texts[:3]
    ref = ds.image(0)
    ref = (ref - ref.min()) / (ref.max() - ref.min())  # 8-bit pictures are min-max scaled, as in prepare
    assert torch.allclose(csv.image(0), ref, atol=0.02)
    with pytest.raises(InputError, match="no such dataset"):
        ImageTextDataset(tmp_path / "nope")


def test_zeroshot_probs_and_auroc():
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    pos, neg = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    p = zeroshot_probs(img, pos, neg, 10.0)
    assert p.shape == (2, 1) and p[0, 0] > 0.99 and p[1, 0] < 0.01
    au = auroc_per_class(
        np.array([[1, 0], [0, 0], [1, 1]]), np.array([[0.9, 0.1], [0.1, 0.2], [0.8, 0.3]]), ["a", "b"]
    )
    assert au["a"] == 1.0 and au["b"] == 1.0
    assert auroc_per_class(np.array([[1], [1]]), np.array([[0.2], [0.3]]), ["c"])["c"] is None


def test_prompts_default_and_file(tmp_path):
    pr = default_prompts(["effusion", "cardiomegaly"])
    assert (
        "Pleural effusion." in pr["effusion"]["positive"]
        and "No pleural effusion." in pr["effusion"]["negative"]
    )
    assert "Heart size is normal." in pr["cardiomegaly"]["negative"]
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"edema": ["pulmonary edema"], "x": {"positive": ["x."], "negative": ["no x."]}}))
    got = load_prompts(f)
    assert (
        got["x"] == {"positive": ["x."], "negative": ["no x."]}
        and "No pulmonary edema." in got["edema"]["negative"]
    )
    f.write_text(json.dumps({"bad": {"positive": []}}))
    with pytest.raises(InputError, match="bad"):
        load_prompts(f)


def test_attribute_prompts_and_selection():
    att = load_prompts("attributes", ["pneumothorax", "cardiomegaly"])
    assert "There is a small right pneumothorax." in att["pneumothorax"]["positive"]
    assert att["pneumothorax"]["negative"] == ["No pneumothorax.", "There is no pneumothorax.",
                                               "No evidence of pneumothorax."]
    assert att["cardiomegaly"] == default_prompts(["cardiomegaly"])["cardiomegaly"]  # no attributes known
    cands = {"default": default_prompts(["pneumothorax", "nodule", "effusion"]),
             "attributes": attribute_prompts(["pneumothorax", "nodule", "effusion"])}
    scores = {"default": {"pneumothorax": 0.79, "nodule": 0.51, "effusion": None},
              "attributes": {"pneumothorax": 0.92, "nodule": 0.49, "effusion": 0.99}}
    pr, chosen = select_prompts(cands, scores)
    # The better validation score wins; an unmeasurable default loses to a measured alternative.
    assert chosen == {"pneumothorax": "attributes", "nodule": "default", "effusion": "attributes"}
    assert pr["pneumothorax"] == cands["attributes"]["pneumothorax"]
    assert pr["nodule"] == cands["default"]["nodule"]
    tie, chosen = select_prompts(cands, {"default": {"nodule": 0.5}, "attributes": {"nodule": 0.5}})
    assert chosen["nodule"] == "default"


def test_corpus_prompts_take_the_archive_wording():
    reports = [
        "Small right pleural effusion. No pneumothorax. Heart size is normal.",
        "No pleural effusion. There is no pneumothorax. The heart is enlarged.",
        "No pleural effusion. No pneumothorax. Heart size is normal.",
        "Left effusion and a right pneumothorax.",  # two findings in one sentence: used for neither
        "FINDINGS: No pleural effusion; the previously seen effusion has resolved. Possible pneumothorax.",
    ]
    pr = corpus_prompts(reports, ["effusion", "pneumothorax", "cardiomegaly", "nodule"], max_per_side=2)
    assert pr["effusion"] == {
        "positive": ["Small right pleural effusion."],
        "negative": [
            "No pleural effusion.",
            "No pleural effusion; the previously seen effusion has resolved.",
        ],
    }  # most frequent first, at most max_per_side
    assert pr["cardiomegaly"] == {
        "positive": ["The heart is enlarged."],
        "negative": ["Heart size is normal."],
    }
    # Never stated present (the hedged mention does not count): the default ensemble instead.
    assert pr["pneumothorax"] == default_prompts(["pneumothorax"])["pneumothorax"]
    assert pr["nodule"] == default_prompts(["nodule"])["nodule"]
    assert load_prompts("reports", ["effusion"], reports=reports)["effusion"] == corpus_prompts(
        reports, ["effusion"])["effusion"]
    with pytest.raises(InputError, match="reports"):
        load_prompts("reports", ["effusion"])


def test_zeroshot_on_trained_run(trained):
    m = trained["model"]
    ds = ImageTextDataset(trained["data"], img_size=32)
    x = torch.stack([ds.image(i) for i in range(len(ds))])
    res = evaluate_zeroshot(m, x, default_prompts(ds.label_names), ds.labels(), ds.label_names)
    assert res["probs"].shape == (32, 2) and ((res["probs"] > 0) & (res["probs"] < 1)).all()
    assert set(res["auroc"]) == {"effusion", "nodule"} and all(0 <= v <= 1 for v in res["auroc"].values())
    cands = {"default": default_prompts(ds.label_names), "attributes": attribute_prompts(ds.label_names)}
    pr, chosen, scores = select_on_split(m, cands, m.encode_images(x), ds.labels(), ds.label_names)
    for f, c in chosen.items():  # the chosen set is the best-scoring one on the selection data
        assert scores[c][f] == max(scores[n][f] for n in cands) and pr[f] == cands[c][f]


def test_recall_at_k_exact():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.0, 0.1, 0.7]])
    r = recall_at_k(sim, torch.eye(3, dtype=torch.bool), (1, 2))
    assert r[1] == pytest.approx(2 / 3) and r[2] == pytest.approx(1.0)
    z = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    m = retrieval_metrics(z, z, ["a", "b", "a", "c", "d", "e"])
    assert m["i2t_R@1"] == 1.0 and m["t2i_R@1"] == 1.0 and m["chance"]["R@1"] == pytest.approx(1 / 6)


def test_index_build_save_load_search(trained, tmp_path):
    m = trained["model"]
    ds = ImageTextDataset(trained["data"], img_size=32)
    img, txt = embed_dataset(m, ds, batch_size=10)
    assert img.shape == txt.shape == (32, m.cfg.proj_dim)
    ix = CaseIndex.build(img, txt, ds.case_ids, ds.texts, ds.patient_ids)
    ix.save(tmp_path / "ix")
    again = CaseIndex.load(tmp_path / "ix")
    sims, rows = again.search(img[3], k=4, modality="image")
    assert rows[0, 0] == 3 and sims[0, 0] == pytest.approx(1.0, abs=1e-4)  # a case is its own nearest image
    assert (np.diff(sims[0]) <= 1e-6).all()
    with pytest.raises(InputError, match="not a retrieval index"):
        CaseIndex.load(tmp_path)
    # RAG on the trained run: one composed report per query, citing indexed cases.
    out = rag_reports(again, img[:2], k=3)
    assert (
        len(out) == 2
        and out[0]["report"].startswith("FINDINGS:")
        and set(out[0]["cited"]) <= set(ds.case_ids)
    )
    assert nearest_reports(again, txt[5:6], modality="text")[0]["report"] == ds.texts[5]


def test_compose_report_votes_and_cites():
    nb = [
        {
            "case_id": "a",
            "similarity": 0.9,
            "report": "FINDINGS: Small right pleural effusion. No pneumothorax.\n"
            "IMPRESSION: 1. Right pleural effusion.",
        },
        {
            "case_id": "b",
            "similarity": 0.85,
            "report": "FINDINGS: There is a left pleural effusion. A 5 mm nodule in the left upper zone.\n"
            "IMPRESSION: 1. Left effusion. 2. Left nodule.",
        },
        {
            "case_id": "c",
            "similarity": 0.5,
            "report": "FINDINGS: No pleural effusion. No pneumothorax.\nIMPRESSION: Normal chest radiograph.",
        },
    ]
    r = compose_report(nb)
    assert r["votes"]["effusion"] > 0.5 and r["votes"]["nodule"] < 0.5
    from medfm.eval.text_metrics import label_report

    lab = label_report(r["report"])
    assert lab.get("effusion") == "positive" and lab.get("nodule") != "positive"
    assert lab.get("pneumothorax") == "negative"
    assert r["cited"][0] == "a" and [e["case_id"] for e in r["evidence"]] == ["a", "b", "c"]
    assert "IMPRESSION: 1. Right pleural effusion." in r["report"]


def test_vqa_questions_parse_and_answer(trained, tmp_path):
    labels = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]], dtype=np.float32)
    names = ["effusion", "nodule", "pneumothorax", "cardiomegaly"]
    qs = phantom_questions(labels, names, seed=1)
    yesno = [q for q in qs if q["question_type"] == "presence"]
    assert len(yesno) == 3
    for q in yesno:
        assert q["answer"] == ("yes" if labels[q["index"], names.index(q["finding"])] else "no")
    choice = [q for q in qs if q["question_type"] == "choice"]
    assert choice and all(q["answer"] in q["options"] for q in choice)
    assert parse_question({"question": "Is there a pleural effusion?", "answer": "yes"}) == {
        "kind": "yesno",
        "phrase": "pleural effusion",
    }
    assert parse_question(
        {"question": "Is the lesion on the left or right?", "answer": "left", "answer_type": "CLOSED"}
    )["options"][-2:] == ["left", "right"]
    assert parse_question({"question": "What organ is shown?", "answer": "lung"})["kind"] == "open"
    f = tmp_path / "q.json"
    f.write_text(
        json.dumps(
            [
                {
                    "image_name": "a.png",
                    "question": "Is there a nodule?",
                    "answer": "Yes",
                    "answer_type": "CLOSED",
                    "question_type": "PRES",
                },
                {"image_name": "a.png", "question": "Where?", "answer": "left lung"},
            ]
        )
    )
    loaded = load_vqa_json(f)
    assert loaded[0]["answer"] == "Yes" and loaded[1]["answer_type"] == "OPEN"
    f.write_text(json.dumps([{"question": "x"}]))
    with pytest.raises(InputError, match="item 0"):
        load_vqa_json(f)
    m = trained["model"]
    ds = ImageTextDataset(trained["data"], img_size=32)
    x = torch.stack([ds.image(i) for i in range(8)])
    qs = phantom_questions(ds.labels()[:8], ds.label_names) + [
        {"index": 0, "question": "What is this?", "answer": "a lung", "question_type": "open"}
    ]
    for method in ("zeroshot", "itm"):
        res = evaluate_vqa(m, x, qs, method=method)
        assert res["n"] == len(qs) - 1 and res["skipped_open"] == 1 and 0 <= res["accuracy"] <= 1
        assert set(res["per_type"]) <= {"presence", "choice"}
    # Given prompts replace the default statements of the findings they cover.
    swapped = {"effusion": {"positive": ["No pleural effusion."], "negative": ["Large pleural effusion."]}}
    q = [{"index": i, "question": "Is there a pleural effusion?", "answer": "yes"} for i in range(8)]
    vqa = ClosedVQA(m, prompts=swapped)
    assert vqa._statements("pleural effusion") == (["No pleural effusion."], ["Large pleural effusion."])
    assert vqa._statements("nodule")[0] == default_prompts(["nodule"])["nodule"]["positive"]
    assert evaluate_vqa(m, x, q, prompts=swapped)["n"] == 8


def test_cli_commands_end_to_end(trained, tmp_path):
    r = CliRunner()
    run, data = str(trained["run"]), str(trained["data"])
    res = r.invoke(app, ["zeroshot", run, data, "--split", "all", "--out", str(tmp_path / "zs")])
    assert res.exit_code == 0, res.output
    assert "effusion" in res.output and "auroc" in json.loads((tmp_path / "zs" / "zeroshot.json").read_text())
    res = r.invoke(app, ["retrieve", run, data, "--query", "Small pleural effusion.", "--k", "3", "--eval"])
    assert res.exit_code == 0, res.output
    assert "i2t_R@1" in res.output and "toy" in res.output
    from PIL import Image

    ds = ImageTextDataset(trained["data"], img_size=32)
    png = tmp_path / "q.png"
    Image.fromarray((ds.image(0)[0].numpy() * 255).astype(np.uint8)).save(png)
    res = r.invoke(app, ["retrieve", run, data, "--query", str(png), "--k", "2"])
    assert res.exit_code == 0 and "toy" in res.output, res.output
    res = r.invoke(app, ["report", run, str(png), "--beam", "2"])
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["report", run, str(png), "--rag", "3", "--train-data", data])
    assert res.exit_code == 0 and "FINDINGS:" in res.output and "Evidence" in res.output, res.output
    res = r.invoke(
        app,
        ["report", run, data, "--eval", "--rag", "3", "--train-data", data, "--out", str(tmp_path / "rep")],
    )
    assert res.exit_code == 0, res.output
    assert "bleu4" in json.loads((tmp_path / "rep" / "report_metrics.json").read_text())
    res = r.invoke(app, ["vqa", run, data, "--split", "all"])
    assert res.exit_code == 0 and "per_type" in res.output, res.output
    res = r.invoke(app, ["zeroshot", run, data, "--prompts", "default,attributes,reports", "--select-on",
                         "train", "--split", "test", "--out", str(tmp_path / "zs2")])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "zs2" / "zeroshot.json").read_text())
    assert got["selected_on"] == "train"
    assert set(got["prompts_chosen"].values()) <= {"default", "attributes", "reports"}
    res = r.invoke(app, ["zeroshot", run, data, "--prompts", "reports", "--reports-split", "test"])
    assert isinstance(res.exception, ConfigError) and "--reports-split" in str(res.exception)
    res = r.invoke(app, ["zeroshot", run, data, "--prompts", "default,attributes"])
    assert isinstance(res.exception, ConfigError) and "--select-on" in str(res.exception)
    res = r.invoke(app, ["zeroshot", str(tmp_path), data])
    assert isinstance(res.exception, InputError) and "not a run directory" in str(res.exception)
    res = r.invoke(app, ["clip", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert isinstance(res.exception, InputError)


def test_clip_run_is_audited_as_a_zero_shot_classifier(trained, tmp_path):
    """Issue 18: `medfm audit` takes a CLIP run (zero-shot, one finding) with zero-shot's probabilities."""
    from medfm.audit.run import AuditConfig, run_audit
    from medfm.audit.zeroshot import zeroshot_classifier
    from medfm.errors import InputError

    m = trained["model"]
    ds = ImageTextDataset(trained["data"], img_size=32)
    x = torch.stack([ds.image(i) for i in range(len(ds))])
    ref = evaluate_zeroshot(m, x, default_prompts(["effusion"]), None, ["effusion"])["probs"][:, 0]
    clf = zeroshot_classifier(trained["run"], "effusion")
    with torch.no_grad():
        p = clf.predict_proba(x)[:, 1]
    np.testing.assert_allclose(p.numpy(), np.asarray(ref), atol=1e-5)
    with pytest.raises(InputError, match="give --label"):
        zeroshot_classifier(trained["run"], None)
    doc = run_audit(trained["run"], [trained["data"]], tmp_path / "audit",
                    AuditConfig(label="effusion", n_boot=20, n_perm=20, n_explain=2, min_group=5))
    assert doc["model"]["kind"] == "clip" and doc["model"]["method"] == "zero-shot"
    assert doc["model"]["label"] == "effusion" and {"cross_site", "ood", "calibration"} <= set(doc)
    (cell,) = doc["cross_site"]["by_dataset"]["cells"]
    assert cell["internal"] and 0 <= cell["auroc"]["value"] <= 1
