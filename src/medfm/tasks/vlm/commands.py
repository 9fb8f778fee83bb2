"""The vision-language commands as library functions: `medfm zeroshot | retrieve | report | vqa` parse their
options, call one of these with a CLIP run directory, and print what comes back.

Each loads the run, reads DATA as the run's images were read (``medfm.data.pairs``), and writes its results
to ``out`` when one is given; the run directory itself is only read (an index cache aside, see
``retrieve_run``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from medfm.data.pairs import ImageTextDataset, model_input
from medfm.errors import ConfigError, InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".nii", ".gz", ".npy")


def load_run(run: str | Path) -> Any:
    """The CLIP model of a run directory (``medfm clip``)."""
    from medfm.models.clip import load_clip

    return load_clip(run)


def dataset_for(model: Any, data: str | Path, split: str) -> ImageTextDataset:
    """DATA's ``split`` ("" or "all": every case) at the model's input size and channels."""
    cfg = model.cfg
    return ImageTextDataset(
        data, split=None if split in ("", "all") else split, img_size=cfg.img_size, in_chans=cfg.in_chans
    )


def stack_images(ds: ImageTextDataset) -> torch.Tensor:
    return torch.stack([ds.image(i) for i in range(len(ds))])


def mined_reports(
    model: Any, data: str | Path, specs: list[str], reports_split: str, split: str
) -> list[str] | None:
    """The report text that ``--prompts reports`` mines (None when no spec asks for it); never the
    evaluated split, so its own reports cannot leak into the prompts."""
    if "reports" not in specs:
        return None
    if reports_split == split:
        raise ConfigError(f"--reports-split {reports_split} is the evaluated split; mine another, e.g. train")
    return dataset_for(model, data, reports_split).texts


def _write_json(out: Path, name: str, obj: Any) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(obj, indent=2))
    return out / name


# ---- zero-shot classification ----------------------------------------------------------------------------
def zeroshot_run(
    run: str | Path,
    data: str | Path,
    prompts: str = "default",
    reports_split: str = "train",
    split: str = "test",
    select_on: str = "",
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Zero-shot multi-label AUROC from class prompts; several comma-separated prompt sets need
    ``select_on`` (a labelled split other than ``split``) to choose one per finding.

    Returns evaluate_zeroshot's result plus ``prompts_chosen`` and ``selected_on``; ``out`` gets
    zeroshot.json (everything but the probabilities) and zeroshot_predictions.csv."""
    from medfm.tasks.vlm.prompts import load_prompts
    from medfm.tasks.vlm.zeroshot import evaluate_zeroshot, select_on_split

    specs = [s.strip() for s in prompts.split(",") if s.strip()] or ["default"]
    if len(specs) > 1 and not select_on:
        raise ConfigError("several --prompts need --select-on SPLIT (a labelled split, e.g. val) to choose")
    if select_on and select_on == split:
        raise ConfigError(f"--select-on {select_on} is the evaluated split; choose on another, e.g. val")
    model = load_run(run)
    ds = dataset_for(model, data, split)
    reports = mined_reports(model, data, specs, reports_split, split)
    candidates = {s: load_prompts(s, ds.label_names or None, reports=reports) for s in specs}
    chosen: dict[str, str] = {f: specs[0] for f in candidates[specs[0]]}
    pr = candidates[specs[0]]
    if select_on:
        sel = dataset_for(model, data, select_on)
        if sel.labels() is None:
            raise InputError(data, f"split '{select_on}' has no labels to choose prompts on")
        pr, chosen, _ = select_on_split(
            model, candidates, model.encode_images(stack_images(sel)), sel.labels(), sel.label_names
        )
    res = evaluate_zeroshot(model, stack_images(ds), pr, ds.labels(), ds.label_names)
    res |= {"prompts_chosen": chosen, "selected_on": select_on or None}
    if out is not None:
        import pandas as pd

        out = Path(out)
        _write_json(out, "zeroshot.json", {k: v for k, v in res.items() if k != "probs"})
        pd.DataFrame(res["probs"], columns=res["findings"]).assign(case_id=ds.case_ids).to_csv(
            out / "zeroshot_predictions.csv", index=False
        )
    return res


# ---- retrieval -------------------------------------------------------------------------------------------
def retrieve_run(
    run: str | Path,
    data: str | Path,
    query: str = "",
    k: int = 5,
    split: str = "all",
    index: str | Path | None = None,
    rebuild: bool = False,
    evaluate: bool = False,
) -> dict[str, Any]:
    """Index DATA's ``split`` (cached in ``index``, default RUN/index-<data name>-<split>) and search it with
    an image file or free-text ``query``.

    Returns ``index`` (its folder), ``indexed`` (cases newly indexed, None when the cache was reused),
    ``metrics`` (Recall@K both directions, with ``evaluate``) and, for a query, ``what`` and ``hits``: rows
    of rank, similarity, case_id, patient_id, report."""
    from medfm.tasks.vlm.retrieval import CaseIndex, embed_dataset, retrieval_metrics

    run, data = Path(run), Path(data)
    model = load_run(run)
    idx_dir = Path(index) if index else run / f"index-{data.stem}-{split}"
    res: dict[str, Any] = {"index": idx_dir, "indexed": None, "metrics": None, "hits": []}
    if rebuild or evaluate or not (idx_dir / "cases.json").is_file():
        ds = dataset_for(model, data, split)
        img, txt = embed_dataset(model, ds)
        ix = CaseIndex.build(img, txt, ds.case_ids, ds.texts, ds.patient_ids)
        ix.save(idx_dir)
        res["indexed"] = len(ix)
        if evaluate:
            res["metrics"] = retrieval_metrics(img, txt, ds.texts)
    else:
        ix = CaseIndex.load(idx_dir)
    if not query:
        return res
    qp = Path(query)
    if qp.suffix and qp.is_file():
        q = model.encode_images(model_input(qp, model)[None])
        modality, res["what"] = "text", "reports nearest to the image"
    elif qp.suffix.lower() in IMAGE_SUFFIXES and not qp.exists():
        raise InputError(qp, "query image not found")
    else:
        q = model.encode_texts([query])
        modality, res["what"] = "image", "images nearest to the text"
    sims, rows = ix.search(q, k, modality)
    for r, (s, i) in enumerate(zip(sims[0], rows[0]), 1):
        c = ix.cases[int(i)]
        res["hits"].append({"rank": r, "similarity": float(s), "case_id": c["case_id"],
                            "patient_id": c["patient_id"], "report": c["report"]})
    return res


# ---- report generation -----------------------------------------------------------------------------------
def report_run(
    run: str | Path,
    image: str | Path,
    beam: int = 1,
    rag: int = 0,
    train_data: str | Path | None = None,
    train_split: str = "train",
    evaluate: bool = False,
    split: str = "test",
    out: str | Path | None = None,
) -> dict[str, Any]:
    """A report for one image file (decoder with ``beam``, or with ``rag`` > 0 composed from the ``rag``
    nearest cases of ``train_data``), or with ``evaluate`` BLEU / ROUGE-L / clinical F1 on dataset IMAGE.

    One image: returns {"report", "beam"} or rag_reports' {"report", "evidence", "cited", ...}; ``out`` gets
    report.json. Evaluation: returns the metrics; ``out`` gets report_metrics.json and generated.json."""
    from medfm.tasks.vlm.rag import rag_reports
    from medfm.tasks.vlm.report import evaluate_reports, generate_reports
    from medfm.tasks.vlm.retrieval import CaseIndex, embed_dataset

    model = load_run(run)
    if rag > 0 and train_data is None:
        raise ConfigError("--rag needs --train-data (the cases to retrieve from)")
    ix = None
    if rag > 0:
        tds = dataset_for(model, train_data, train_split)
        img, txt = embed_dataset(model, tds)
        ix = CaseIndex.build(img, txt, tds.case_ids, tds.texts, tds.patient_ids)

    def generate(x: torch.Tensor) -> list[dict[str, Any]]:
        if ix is not None:
            return rag_reports(ix, model.encode_images(x), rag)
        return [{"report": t, "beam": beam} for t in generate_reports(model, x, beam=beam)]

    if evaluate:
        ds = dataset_for(model, image, split)
        gen = [r["report"] for r in generate(stack_images(ds))]
        res = evaluate_reports(gen, ds.texts)
        if out is not None:
            _write_json(Path(out), "report_metrics.json", res)
            _write_json(Path(out), "generated.json", [
                {"case_id": c, "generated": g, "reference": r} for c, g, r in zip(ds.case_ids, gen, ds.texts)
            ])
        return res
    image = Path(image)
    if not image.is_file():
        raise InputError(image, "image not found (use --eval to evaluate on a dataset)")
    r = generate(model_input(image, model)[None])[0]
    if out is not None:
        _write_json(Path(out), "report.json", r)
    return r


# ---- closed visual question answering --------------------------------------------------------------------
def vqa_run(
    run: str | Path,
    data: str | Path,
    questions: str | Path | None = None,
    method: str = "zeroshot",
    split: str = "test",
    prompts: str = "default",
    reports_split: str = "train",
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Closed-question accuracy per question type: VQA-RAD / SLAKE style ``questions`` about the images in
    folder DATA, or questions generated from a labelled dataset's labels. ``out`` gets vqa.json."""
    from medfm.tasks.vlm.prompts import SYNONYMS, load_prompts
    from medfm.tasks.vlm.vqa import evaluate_vqa, load_vqa_json, phantom_questions

    if method not in ("zeroshot", "itm"):
        raise ConfigError(f"--method must be zeroshot or itm, got {method!r}")
    data = Path(data)
    model = load_run(run)
    if questions is not None:
        questions = Path(questions)
        qs = load_vqa_json(questions)
        names = sorted({q["image_name"] for q in qs})
        missing = [n for n in names if not (data / n).is_file()]
        if missing:
            raise InputError(
                data / missing[0], f"image named in {questions.name} not found ({len(missing)} missing)"
            )
        images = torch.stack([model_input(data / n, model) for n in names])
        pos = {n: i for i, n in enumerate(names)}
        qs = [{**q, "index": pos[q["image_name"]]} for q in qs]
    else:
        ds = dataset_for(model, data, split)
        if ds.labels() is None:
            raise InputError(data, "no label columns to generate questions from (give --questions)")
        qs = phantom_questions(ds.labels(), ds.label_names)
        images = stack_images(ds)
    if prompts == "reports" and questions is not None:
        raise ConfigError("--prompts reports mines a dataset's reports; it does not work with --questions")
    reports = mined_reports(model, data, [prompts], reports_split, split)
    pr = load_prompts(prompts, list(SYNONYMS), reports=reports)
    res = evaluate_vqa(model, images, qs, method, pr)
    if out is not None:
        _write_json(Path(out), "vqa.json", res)
    return res
