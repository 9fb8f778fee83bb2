"""Vision-language quality numbers -> benchmarks/results/vlm_quality.json (one key per stage, merged).

Stages (``--stage``, default all):

phantom  A CLIP run trained on prepared phantom CXR data (``medfm clip``; trained here if --run is missing):
         zero-shot AUROC per finding, retrieval Recall@1/5/10 both ways, reports from the decoder (greedy),
         from plain retrieval (nearest training report) and retrieval-augmented (per-finding vote over k
         neighbours): BLEU-1..4, ROUGE-L, clinical P/R/F1; closed VQA accuracy.
covid    Real: /work/shared/data/covid_cxr_notes (images + clinical notes), patient-level split; CLIP trained
         from scratch on the train patients; retrieval R@10 vs chance (10/N_test) on test patients, zero-shot
         AUROC for findings the notes mention (labels read from the test notes by the rule-based labeller).
iu       Real text only: /work/shared/data/iu_xray_reports (R2Gen split). The report decoder trained as a
         language model on train reports: perplexity on test reports (vs a unigram baseline on the same
         vocabulary). A retrieval baseline without images: embed each test IMPRESSION with MiniLM, take the
         FINDINGS of the nearest train study (by its impression), score against the test FINDINGS.

Zero-shot and VQA are scored twice: with the default prompts, and with the prompt set chosen per finding on
the val split among default / attributes / reports (sentences mined from the training reports).

Example (the best phantom run so far: 6000 cases, ResNet-18 w32 tower, 2800 steps then 4000 more from a
warm start, about 45 + 58 min on 2 CPU cores; the nodule is learnt late, so fewer steps or the 1500-case
set leave its zero-shot AUROC near 0.6–0.8)::

    .venv/bin/medfm data phantom --n 6000 --out runs/h9/phantom_raw6k --workers 2
    .venv/bin/medfm data prepare runs/h9/phantom_raw6k/manifest.csv -o runs/h9/prep128_6k --size 128
    .venv/bin/python benchmarks/bench_vlm_quality.py --stage phantom --data runs/h9/prep128_6k \\
        --img-size 128 --encoder resnet18 --encoder-args '{"width": 32}' --text-pooling sentences \\
        --run runs/h9/clip_6k_w32_128_s2800 --work runs/h9 --key phantom_6k_resnet18_s2800 --epochs 60 \\
        --max-steps 2800 --w-caption 0.5 --lr 5e-4 --threads 2
    .venv/bin/python benchmarks/bench_vlm_quality.py --stage phantom --data runs/h9/prep128_6k \\
        --img-size 128 --encoder resnet18 --encoder-args '{"width": 32}' --text-pooling sentences \\
        --init-clip runs/h9/clip_6k_w32_128_s2800 --run runs/h9/clip_6k_w32_128_s6800 --work runs/h9 \\
        --key phantom_6k_resnet18_s6800 --epochs 70 --max-steps 4000 --max-seconds 3700 --w-caption 0.5 \\
        --lr 4e-4 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "vlm_quality.json"
PHANTOM_FINDINGS = ["nodule", "effusion", "consolidation", "cardiomegaly", "pneumothorax"]


def _merge(key: str, value: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    cur = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    cur[key] = value
    RESULTS.write_text(json.dumps(cur, indent=2, default=float))
    print(json.dumps({key: value}, indent=2, default=float)[:4000])


def _round(d):
    if isinstance(d, dict):
        return {k: _round(v) for k, v in d.items()}
    if isinstance(d, float):
        return round(d, 4)
    return d


def _eval_run(model, train_ds, test_ds, findings, k_rag: int = 5, beam: int = 1, max_gen: int | None = None,
              val_ds=None):
    from medfm.tasks.vlm.rag import nearest_reports, rag_reports
    from medfm.tasks.vlm.report import evaluate_reports, generate_reports
    from medfm.tasks.vlm.retrieval import CaseIndex, embed_dataset, retrieval_metrics
    from medfm.tasks.vlm.vqa import evaluate_vqa, phantom_questions
    from medfm.tasks.vlm.zeroshot import evaluate_zeroshot

    out: dict = {"n_train": len(train_ds), "n_test": len(test_ds)}
    x = torch.stack([test_ds.image(i) for i in range(len(test_ds))])
    img, txt = embed_dataset(model, test_ds)
    from medfm.tasks.vlm.prompts import default_prompts

    if test_ds.labels() is not None:
        zs = evaluate_zeroshot(
            model,
            None,
            default_prompts(test_ds.label_names),
            test_ds.labels(),
            test_ds.label_names,
            img_emb=img,
        )
        out["zeroshot"] = {
            "auroc": zs.get("auroc"),
            "mean_auroc": zs.get("mean_auroc"),
            "prevalence": zs.get("prevalence"),
        }
        if val_ds is not None:
            out |= _selected(model, val_ds, test_ds, train_ds.texts, test_emb=img, images=x)
        out["vqa"] = {
            k: v
            for k, v in evaluate_vqa(
                model, x, phantom_questions(test_ds.labels(), test_ds.label_names)
            ).items()
            if k != "answers"
        }
    r = retrieval_metrics(img, txt, test_ds.texts)
    out["retrieval"] = r
    tr_img, tr_txt = embed_dataset(model, train_ds)
    ix = CaseIndex.build(tr_img, tr_txt, train_ds.case_ids, train_ds.texts, train_ds.patient_ids)
    refs = list(test_ds.texts)
    reports = {}
    if model.decoder is not None:
        t0 = time.perf_counter()
        gen = generate_reports(model, x if max_gen is None else x[:max_gen], beam=beam)
        reports["decoder_greedy" if beam == 1 else f"decoder_beam{beam}"] = {
            **evaluate_reports(gen, refs[: len(gen)], findings),
            "seconds": time.perf_counter() - t0,
            "example": gen[0],
        }
    near = [r["report"] for r in nearest_reports(ix, img)]
    reports["retrieval_nearest"] = {**evaluate_reports(near, refs, findings), "example": near[0]}
    rag = rag_reports(ix, img, k=k_rag)
    reports[f"rag_k{k_rag}"] = {
        **evaluate_reports([r["report"] for r in rag], refs, findings),
        "example": rag[0]["report"],
        "example_cited": rag[0]["cited"],
    }
    out["reports"] = reports
    out["reference_example"] = refs[0]
    return out


def stage_phantom(args) -> None:
    from medfm.tasks.vlm.data import ImageTextDataset
    from medfm.train.clip import ClipConfig, load_clip, train_clip

    run = Path(args.run)
    if not (run / "config.json").is_file():
        cfg = ClipConfig(
            data=args.data,
            out=str(run),
            batch_size=args.batch,
            epochs=args.epochs,
            max_steps=args.max_steps,
            max_seconds=args.max_seconds,
            w_caption=args.w_caption,
            lock_text=0,
            text_pooling=args.text_pooling,
            img_size=args.img_size,
            encoder=args.encoder,
            encoder_kwargs=json.loads(args.encoder_args)
            if args.encoder_args
            else {"patch_size": args.patch_size, "depth": 4},
            init_from=args.init_from or None,
            init_clip=args.init_clip or None,
            lock_image=args.lock_image,
            lr=args.lr,
            threads=args.threads,
        )
        train_clip(cfg)
    model = load_clip(run)
    m = json.loads((run / "metrics.json").read_text())
    size = model.cfg.img_size
    train = ImageTextDataset(args.data, split="train", img_size=size)
    val = ImageTextDataset(args.data, split="val", img_size=size)
    test = ImageTextDataset(args.data, split="test", img_size=size)
    if args.zeroshot_only:  # add the val-selected zero-shot and VQA to an existing entry, nothing else re-run
        cur = json.loads(RESULTS.read_text()).get(args.key, {}) if RESULTS.is_file() else {}
        _merge(args.key, _round({**cur, **_selected(model, val, test, train.texts)}))
        return
    res = _eval_run(model, train, test, PHANTOM_FINDINGS, k_rag=args.k, val_ds=val)
    res["train"] = {k: v for k, v in m.items() if k != "history"}
    res["run"] = str(run)
    _merge(args.key, _round(res))


def val_selected_prompts(model, val, names: list[str], train_texts: list[str] | None = None
                         ) -> tuple[dict, dict, dict]:
    """Per finding in ``names``, the prompt set (default / attributes / reports, the last mined from
    ``train_texts``) that scores best on the validation split: (prompts, finding -> chosen set,
    set -> finding -> val AUROC)."""
    from medfm.tasks.vlm.prompts import attribute_prompts, corpus_prompts, default_prompts
    from medfm.tasks.vlm.retrieval import embed_dataset
    from medfm.tasks.vlm.zeroshot import select_on_split

    cands = {"default": default_prompts(names), "attributes": attribute_prompts(names)}
    if train_texts:
        cands["reports"] = corpus_prompts(train_texts, names)
    return select_on_split(model, cands, embed_dataset(model, val)[0], val.labels(), val.label_names)


def _selected(model, val, test, train_texts, test_emb=None, images=None) -> dict:
    """Zero-shot test AUROC and VQA accuracy with, per finding, the prompt set (default / attributes /
    reports mined from ``train_texts``) that scored best on the validation split; the test split plays no
    part in the choice. ``test_emb`` / ``images``: already computed test embeddings / loaded test images."""
    from medfm.tasks.vlm.retrieval import embed_dataset
    from medfm.tasks.vlm.vqa import evaluate_vqa, phantom_questions
    from medfm.tasks.vlm.zeroshot import evaluate_zeroshot

    names = test.label_names
    prompts, chosen, val_scores = val_selected_prompts(model, val, names, train_texts)
    if test_emb is None:
        test_emb = embed_dataset(model, test)[0]
    if images is None:
        images = torch.stack([test.image(i) for i in range(len(test))])
    zs = evaluate_zeroshot(model, None, prompts, test.labels(), names, img_emb=test_emb)
    vqa = evaluate_vqa(model, images, phantom_questions(test.labels(), names), prompts=prompts)
    return {
        "zeroshot_val_selected": {"auroc": zs.get("auroc"), "mean_auroc": zs.get("mean_auroc"),
                                  "chosen": chosen, "val_auroc": val_scores},
        "vqa_val_selected": {k: v for k, v in vqa.items() if k != "answers"},
    }


def stage_covid(args) -> None:
    import pandas as pd

    from medfm.data.splits import make_splits
    from medfm.eval.text_metrics import POSITIVE, label_report
    from medfm.tasks.vlm.data import ImageTextDataset
    from medfm.train.clip import ClipConfig, load_clip, train_clip

    src = Path(args.covid)
    df = pd.read_csv(src / "manifest.csv")
    df["image"] = [str((src / p).resolve()) for p in df["image"]]
    df["patient_id"] = df["patient_id"].astype(str)
    df["split"] = make_splits(df, (0.7, 0.1, 0.2), seed=0, group="patient_id").values
    notes_findings = ["consolidation", "effusion"]
    for f in notes_findings:
        df[f] = [int(label_report(t).get(f) == POSITIVE) for t in df["text"].fillna("")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    man = work / "covid_manifest.csv"
    df[["image", "text", "patient_id", "split", *notes_findings]].to_csv(man, index=False)
    run = work / f"clip_covid_{args.text_pooling}"
    if not (run / "config.json").is_file():
        cfg = ClipConfig(
            data=str(man),
            out=str(run),
            img_size=64,
            batch_size=64,
            epochs=args.covid_epochs,
            lock_text=0,
            text_pooling=args.text_pooling,
            max_text_len=128,
            lr=1e-3,
            threads=args.threads,
        )
        train_clip(cfg)
    model = load_clip(run)
    train = ImageTextDataset(man, split="train", img_size=64, label_columns=notes_findings)
    test = ImageTextDataset(man, split="test", img_size=64, label_columns=notes_findings)
    leak = set(train.patient_ids) & set(test.patient_ids)
    from medfm.tasks.vlm.prompts import corpus_prompts, default_prompts
    from medfm.tasks.vlm.retrieval import embed_dataset, retrieval_metrics
    from medfm.tasks.vlm.zeroshot import evaluate_zeroshot

    img, txt = embed_dataset(model, test)
    r = retrieval_metrics(img, txt, test.texts)
    zs = evaluate_zeroshot(
        model, None, default_prompts(notes_findings), test.labels(), notes_findings, img_emb=img
    )
    # The same with prompts mined from the training notes (no val split is big enough to choose on here).
    zs_rep = evaluate_zeroshot(
        model, None, corpus_prompts(train.texts, notes_findings), test.labels(), notes_findings, img_emb=img
    )
    m = json.loads((run / "metrics.json").read_text())
    _merge(
        "covid_cxr_notes",
        _round(
            {
                "n_train": len(train),
                "n_test": len(test),
                "test_patients": len(set(test.patient_ids)),
                "patients_in_both_splits": len(leak),
                "retrieval": r,
                "chance_R@10": min(1.0, 10 / len(test)),
                "zeroshot_notes_labels": {
                    "auroc": zs.get("auroc"),
                    "prevalence": zs.get("prevalence"),
                    "label_source": "rule-based labeller on each test case's own notes",
                    "auroc_reports_prompts": zs_rep.get("auroc"),
                },
                "train": {k: v for k, v in m.items() if k != "history"},
            }
        ),
    )


def stage_iu(args) -> None:
    import pandas as pd

    from medfm.eval.text_metrics import report_metrics
    from medfm.models.report_decoder import ReportDecoder, WordVocab, perplexity
    from medfm.models.text import create_text_tower

    torch.manual_seed(0)
    df = pd.read_csv(Path(args.iu) / "reports.csv").fillna("")
    df["report"] = "FINDINGS: " + df["findings"].str.strip() + " IMPRESSION: " + df["impression"].str.strip()
    train, test = df[df.split == "train"], df[df.split == "test"]
    vocab = WordVocab.build(train["report"], min_count=2)
    max_len = 120
    dec = ReportDecoder(len(vocab), memory_dim=8, dim=128, depth=2, heads=4, max_len=max_len, dropout=0.1)
    toks = vocab.batch(list(train["report"]), max_len)
    test_toks = vocab.batch(list(test["report"]), max_len)
    opt = torch.optim.AdamW(dec.parameters(), lr=2e-3, weight_decay=0.01)
    steps, bs = args.iu_steps, 64
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    dec.train()
    for s in range(steps):
        idx = torch.randint(0, len(toks), (bs,), generator=g)
        b = toks[idx]
        b = b[:, : int((b != vocab.pad).sum(1).max())]
        loss = dec.loss(b, None, vocab.pad)
        opt.zero_grad()
        loss.backward()
        for gr in opt.param_groups:
            gr["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * s / steps))
        opt.step()
    dec.eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(test_toks), 64):
            b = test_toks[i : i + 64]
            b = b[:, : int((b != vocab.pad).sum(1).max())]
            a, c = dec.token_nll(b, None, vocab.pad)
            nll, n = nll + float(a), n + c
    # Unigram baseline (add-one smoothing) on the same vocabulary and targets.
    counts = torch.bincount(toks[:, 1:][toks[:, 1:] != vocab.pad].flatten(), minlength=len(vocab)).float() + 1
    logp = (counts / counts.sum()).log()
    tgt = test_toks[:, 1:][test_toks[:, 1:] != vocab.pad]
    unigram = float(torch.exp(-logp[tgt].mean()))
    unk = float((tgt == vocab.unk).float().mean())
    lm = {
        "test_perplexity": perplexity(nll, n),
        "unigram_perplexity": unigram,
        "test_tokens": n,
        "unk_rate": unk,
        "vocab": len(vocab),
        "train_reports": len(train),
        "test_reports": len(test),
        "steps": steps,
        "train_seconds": time.perf_counter() - t0,
    }
    # Retrieval baseline: impression -> nearest train impression (MiniLM) -> its findings.
    tr = train[(train.findings.str.len() > 0) & (train.impression.str.len() > 0)]
    te = test[(test.findings.str.len() > 0) & (test.impression.str.len() > 0)]
    tower = create_text_tower("minilm")
    e_tr = tower.encode(list(tr.impression))
    e_te = tower.encode(list(te.impression))
    nn_idx = (e_te @ e_tr.t()).argmax(1).numpy()
    preds = list(tr.findings.iloc[nn_idx])
    refs = list(te.findings)
    ret = report_metrics(preds, refs)
    most_common = tr.findings.value_counts().index[0]
    const = report_metrics([most_common] * len(refs), refs)
    _merge(
        "iu_xray_reports",
        _round(
            {
                "decoder_language_model": lm,
                "retrieval_impression_to_findings": {k: v for k, v in ret.items()},
                "constant_most_common_findings": {k: v for k, v in const.items() if not isinstance(v, dict)},
                "note": "no images: the retrieval baseline maps a test study's impression to the findings of "
                "the train "
                "study with the most similar impression (MiniLM cosine); references = test findings",
            }
        ),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", default="all", choices=["all", "phantom", "covid", "iu"])
    p.add_argument("--data", default="runs/h7/phantom_prep", help="Prepared phantom CXR dataset.")
    p.add_argument("--run", default="runs/h7/clip_phantom", help="CLIP run on the phantom data.")
    p.add_argument("--work", default="runs/h7", help="Folder for derived manifests and runs.")
    p.add_argument("--covid", default="", help="covid_cxr_notes folder (default: shared data).")
    p.add_argument("--iu", default="", help="iu_xray_reports folder (default: shared data).")
    p.add_argument("--key", default="phantom", help="Result key of the phantom stage.")
    p.add_argument("--init-from", default="", help="Phantom stage: image tower from this run (MAE).")
    p.add_argument("--init-clip", default="", help="Phantom stage: warm start from this CLIP run.")
    p.add_argument("--lock-image", type=int, default=-1, help="Phantom stage: -1 train all, N last N blocks.")
    p.add_argument("--lr", type=float, default=3e-4, help="Phantom stage learning rate.")
    p.add_argument("--batch", type=int, default=64, help="Phantom stage batch size.")
    p.add_argument("--epochs", type=int, default=12, help="Phantom stage epochs (sets the LR schedule).")
    p.add_argument("--max-steps", type=int, default=0, help="Phantom stage step cap (0: --epochs).")
    p.add_argument("--max-seconds", type=float, default=0.0, help="Phantom stage training time cap.")
    p.add_argument("--w-caption", type=float, default=0.5, help="Phantom stage report-generation weight.")
    p.add_argument("--text-pooling", default="report", help="Phantom and covid stages: report | sentences.")
    p.add_argument(
        "--img-size", type=int, default=64, help="Phantom stage image size (data prepared at >= it)."
    )
    p.add_argument("--patch-size", type=int, default=8, help="Phantom stage ViT patch size.")
    p.add_argument("--encoder", default="vit_tiny", help="Phantom stage image tower (`medfm models list`).")
    p.add_argument(
        "--encoder-args",
        default="",
        help='Phantom stage image-tower options as JSON, e.g. \'{"width": 32}\' (default: ViT depth 4, '
        "--patch-size)",
    )
    p.add_argument("--k", type=int, default=5, help="Neighbours for retrieval-augmented reports.")
    p.add_argument("--zeroshot-only", action="store_true",
                   help="Phantom stage, existing run: only add the val-selected zero-shot + VQA.")
    p.add_argument("--covid-epochs", type=int, default=30)
    p.add_argument("--iu-steps", type=int, default=400)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from medfm.paths import shared_data_dir

    args.covid = args.covid or str(shared_data_dir() / "covid_cxr_notes")
    args.iu = args.iu or str(shared_data_dir() / "iu_xray_reports")
    np.random.seed(0)
    if args.stage in ("all", "phantom"):
        stage_phantom(args)
    if args.stage in ("all", "iu"):
        stage_iu(args)
    if args.stage in ("all", "covid"):
        stage_covid(args)


if __name__ == "__main__":
    main()
