"""CLI: vision-language commands — `medfm clip` (train), `medfm zeroshot`, `medfm retrieve`, `medfm report`,
`medfm vqa`. Thin: parse, call medfm.train.clip / medfm.tasks.vlm, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

_ENC = "Image tower"
_TXT = "Text tower"
_OBJ = "Objectives"
_OPT = "Optimisation"


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def clip(
    data: str = typer.Argument(
        ...,
        help="Image-report pairs: a prepared dataset directory (`medfm data prepare`) "
        "or a CSV/Parquet manifest with image and report columns.",
    ),
    out: str = typer.Option(..., "--out", "-o", help="Run directory to write."),
    split: str = typer.Option("train", help="Split to train on ('all' for every case)."),
    encoder: str = typer.Option(
        "vit_tiny",
        help="Image encoder from `medfm models list` (trained from scratch).",
        rich_help_panel=_ENC,
    ),
    init_from: str = typer.Option(
        "",
        help="Start the image tower from a run directory or weights file (e.g. a `medfm pretrain mae` run).",
        rich_help_panel=_ENC,
    ),
    init_clip: str = typer.Option(
        "",
        help="Start every weight (both towers, heads, decoder) from an earlier `medfm pretrain clip` run, "
        "with a fresh optimiser and LR schedule: trains a finished run longer. Its architecture is kept.",
        rich_help_panel=_ENC,
    ),
    spatial_dims: int = typer.Option(2, help="2 for images, 3 for volumes.", rich_help_panel=_ENC),
    in_chans: int = typer.Option(1, help="Image channels (1: grey images natively).", rich_help_panel=_ENC),
    img_size: int = typer.Option(64, help="Input size per axis (images are resized).", rich_help_panel=_ENC),
    patch_size: int | None = typer.Option(
        None, help="Patch size of encoders that have one (default 8; ignored with --init-from).",
        rich_help_panel=_ENC, show_default=False,
    ),
    depth: int | None = typer.Option(
        None, help="Depth of encoders that take one, e.g. scratch ViTs (default 4; ignored with --init-from)",
        rich_help_panel=_ENC, show_default=False,
    ),
    encoder_args: str = typer.Option(
        "", help="More encoder options as JSON, e.g. '{\"embed_dim\": 128}'.", rich_help_panel=_ENC
    ),
    lock_image: int = typer.Option(
        -1, help="-1 train the image tower, 0 lock it, N train only its last N blocks.", rich_help_panel=_ENC
    ),
    text_tower: str = typer.Option(
        "minilm",
        help="Text tower: 'minilm' (bundled all-MiniLM-L6-v2) or a local Hugging Face BERT-style directory.",
        rich_help_panel=_TXT,
    ),
    lock_text: int = typer.Option(
        2, help="-1 train the text tower, 0 lock it, N train only its last N layers.", rich_help_panel=_TXT
    ),
    max_text_len: int = typer.Option(96, help="Report tokens seen by the text tower.", rich_help_panel=_TXT),
    text_pooling: str = typer.Option(
        "report",
        help="'report': embed the whole report; 'sentences': average per-sentence embeddings, which matches "
        "single-sentence zero-shot prompts (needs --lock-text 0).",
        rich_help_panel=_TXT,
    ),
    sentence_dropout: float = typer.Option(
        0.3,
        help="With --text-pooling sentences: chance to leave a sentence out per step.",
        rich_help_panel=_TXT,
    ),
    proj_dim: int = typer.Option(128, help="Joint embedding size.", rich_help_panel=_OBJ),
    w_contrastive: float = typer.Option(
        1.0, help="Weight of the symmetric InfoNCE loss.", rich_help_panel=_OBJ
    ),
    w_itm: float = typer.Option(
        0.0, help="Weight of image-text matching with hard negatives (0: off).", rich_help_panel=_OBJ
    ),
    w_caption: float = typer.Option(
        0.0, help="Weight of the report-generation loss (0: no decoder).", rich_help_panel=_OBJ
    ),
    max_report_len: int = typer.Option(80, help="Decoder length in words.", rich_help_panel=_OBJ),
    epochs: int = typer.Option(10, help="Passes over the data.", rich_help_panel=_OPT),
    max_steps: int = typer.Option(0, help="Stop after this many steps (0: no limit).", rich_help_panel=_OPT),
    max_seconds: float = typer.Option(
        0.0, help="Stop after this much training wall time in seconds (0: no limit).", rich_help_panel=_OPT
    ),
    checkpoint_every: int = typer.Option(
        0,
        help="Keep a resumable state (optimiser, schedule position, random streams) in OUT/resume every this "
        "many steps (0: only when --max-seconds stops the run).",
        rich_help_panel=_OPT,
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the unfinished run in --out from its resume/ state (same options).",
        rich_help_panel=_OPT,
    ),
    batch_size: int = typer.Option(64, help="Pairs per contrastive batch.", rich_help_panel=_OPT),
    grad_cache: int = typer.Option(
        0,
        help="Gradient caching: embed the batch in chunks of this size so large "
        "batches fit small memory (0: off).",
        rich_help_panel=_OPT,
    ),
    lr: float = typer.Option(5e-4, help="AdamW learning rate (image tower and heads).", rich_help_panel=_OPT),
    text_lr: float = typer.Option(
        5e-5, help="Learning rate of the unlocked text layers.", rich_help_panel=_OPT
    ),
    augment: bool = typer.Option(
        True, "--augment/--no-augment", help="Small shifts and contrast jitter.", rich_help_panel=_OPT
    ),
    seed: int = typer.Option(0, help="Random seed.", rich_help_panel=_OPT),
    threads: int = typer.Option(0, help="CPU threads for torch (0: default).", rich_help_panel=_OPT),
    device: str = typer.Option("auto", help="auto | cpu | cuda.", rich_help_panel=_OPT),
    precision: str = typer.Option(
        "32", help="32 | bf16-mixed | 16-mixed (16-mixed: GPU only, not with --grad-cache).",
        rich_help_panel=_OPT,
    ),
    compile: bool = typer.Option(
        False, "--compile/--no-compile", help="torch.compile the towers (eager with a warning if it fails).",
        rich_help_panel=_OPT,
    ),
) -> None:
    """Train a CLIP-style image-report model (contrastive + optional ITM + report decoder) into a run dir.

    DATA: a prepared dataset directory (`medfm data prepare`) or a CSV/Parquet manifest with image and report
    columns.
    """
    options = dict(locals())  # the parsed options, named like ClipConfig's fields
    from medfm.train.clip import train_from_options
    from medfm.train.precision import describe_speed

    run, m = train_from_options(options)
    speed = describe_speed(m)
    typer.echo(
        f"wrote {run}  (steps {m['steps']}, final loss {m['final_loss']:.4f}, {m['pairs_per_s']} pairs/s"
        + (f", {speed})" if speed else ")")
    )


def zeroshot(
    run: Path = typer.Argument(..., help="CLIP run directory (from `medfm clip`)."),
    data: Path = typer.Argument(..., help="Prepared dataset or manifest to classify."),
    prompts: str = typer.Option(
        "default",
        help="'default' (short prompt ensembles for the dataset's label names), 'attributes' (report-style "
        "sentences naming side / size / zone), 'reports' (the sentences of DATA's --reports-split reports "
        "that state each finding present / absent: the archive's own wording, no image labels used) or a "
        "JSON file {finding: {positive: [...], negative: [...]}}; several, comma-separated, with "
        "--select-on.",
    ),
    reports_split: str = typer.Option(
        "train", help="With --prompts reports: the split of DATA whose report text is mined for prompts."
    ),
    split: str = typer.Option("test", help="Split to classify ('all' for every case)."),
    select_on: str = typer.Option(
        "", help="With several --prompts: per finding, use the set with the best AUROC on this labelled "
        "split (e.g. val; must differ from --split)."
    ),
    out: Path = typer.Option(None, "--out", "-o", help="Write metrics JSON (and predictions CSV) here."),
) -> None:
    """Zero-shot multi-label classification from class prompts (positive vs negative), AUROC per class.

    RUN: a CLIP run directory (`medfm clip`). DATA: a prepared dataset or manifest to classify.
    """
    from rich.console import Console
    from rich.table import Table

    from medfm.tasks.vlm.commands import zeroshot_run

    res = zeroshot_run(run, data, prompts, reports_split, split, select_on, out)
    t = Table(title=f"zero-shot on {data} ({res['n']} cases)")
    for c in ("finding", "AUROC", "mean prob", "prompts"):
        t.add_column(c)
    for j, f in enumerate(res["findings"]):
        au = (res.get("auroc") or {}).get(f)
        auc = "-" if au is None else f"{au:.3f}"
        t.add_row(f, auc, f"{res['probs'][:, j].mean():.3f}", res["prompts_chosen"].get(f, ""))
    Console().print(t)
    if out is not None:
        typer.echo(f"wrote {out / 'zeroshot.json'}")


def retrieve(
    run: Path = typer.Argument(..., help="CLIP run directory."),
    data: Path = typer.Argument(
        ..., help="Prepared dataset or manifest to search (indexed once, then reused)."
    ),
    query: str = typer.Option("", "--query", "-q", help="An image file path, or free text."),
    k: int = typer.Option(5, help="Number of cases to show."),
    split: str = typer.Option("all", help="Split of DATA to index ('all' for every case)."),
    index: Path = typer.Option(
        None, help="Index directory (default RUN/index-<data name>); rebuilt with --rebuild."
    ),
    rebuild: bool = typer.Option(False, help="Rebuild the index even if it exists."),
    evaluate: bool = typer.Option(False, "--eval", help="Also report Recall@1/5/10 both directions on DATA."),
) -> None:
    """Cross-modal retrieval: the cases whose images / reports are nearest to an image or a text query.

    RUN: a CLIP run directory. DATA: the prepared dataset or manifest to search (indexed once, then reused).
    """
    from rich.console import Console
    from rich.table import Table

    from medfm.tasks.vlm.commands import retrieve_run

    res = retrieve_run(run, data, query, k, split, index, rebuild, evaluate)
    if res["indexed"] is not None:
        typer.echo(f"indexed {res['indexed']} cases -> {res['index']}")
    if res["metrics"] is not None:
        _print_json(res["metrics"])
    if not query:
        return
    t = Table(title=f"{res['what']}: {query[:60]}")
    cols = ("rank", "similarity", "case_id", "patient_id", "report")
    for c in cols:
        t.add_column(c, overflow="fold")
    for h in res["hits"]:
        t.add_row(str(h["rank"]), f"{h['similarity']:.3f}", h["case_id"], h["patient_id"], h["report"][:300])
    Console().print(t)


def report(
    run: Path = typer.Argument(
        ..., help="CLIP run directory trained with a report decoder (--w-caption > 0)."
    ),
    image: Path = typer.Argument(..., help="An image file, or a dataset (prepared / manifest) with --eval."),
    beam: int = typer.Option(1, help="Beam width (1: greedy decoding)."),
    rag: int = typer.Option(
        0,
        help="Retrieval-augmented: compose the report from the k most similar cases of "
        "--train-data (per-finding vote), citing their case ids. 0: use the decoder.",
    ),
    train_data: Path = typer.Option(None, help="Dataset whose cases are retrieved for --rag."),
    train_split: str = typer.Option("train", help="Split of --train-data to index."),
    evaluate: bool = typer.Option(
        False,
        "--eval",
        help="IMAGE is a dataset: generate for its --split and report "
        "BLEU-1..4, ROUGE-L and clinical F1 against its reports.",
    ),
    split: str = typer.Option("test", help="Split of the dataset evaluated with --eval."),
    out: Path = typer.Option(None, "--out", "-o", help="Write metrics / generated reports JSON here."),
) -> None:
    """Write a FINDINGS / IMPRESSION report for an image (decoder, or retrieval-augmented with evidence).

    RUN: a CLIP run directory trained with --w-caption > 0 (for decoder reports). IMAGE: an image file, or a
    dataset when --eval is given.
    """
    from medfm.tasks.vlm.commands import report_run

    res = report_run(run, image, beam, rag, train_data, train_split, evaluate, split, out)
    if evaluate:
        _print_json(res)
        return
    typer.echo(res["report"])
    if "evidence" in res:
        typer.echo(f"\nEvidence (most similar cases): {', '.join(e['case_id'] for e in res['evidence'])}")
        typer.echo(f"Sentences taken from: {', '.join(res['cited'])}")


def vqa(
    run: Path = typer.Argument(..., help="CLIP run directory."),
    data: Path = typer.Argument(
        ...,
        help="Dataset with labels (phantom questions are generated from them), or, "
        "with --questions, the folder holding the questions' images.",
    ),
    questions: Path = typer.Option(
        None,
        help="VQA-RAD / SLAKE style JSON list (image_name, question, answer, answer_type, question_type).",
    ),
    method: str = typer.Option(
        "zeroshot", help="zeroshot (prompt ensembles) | itm (the run's matching head)."
    ),
    split: str = typer.Option("test", help="Split of a labelled dataset to ask about."),
    prompts: str = typer.Option(
        "default",
        help="Statements behind a finding's yes/no: 'default', 'attributes', 'reports' (mined from "
        "--reports-split of DATA) or a JSON prompts file, as in `medfm zeroshot`.",
    ),
    reports_split: str = typer.Option(
        "train", help="With --prompts reports: the split of DATA whose reports are mined."
    ),
    out: Path = typer.Option(None, "--out", "-o", help="Write accuracy and answers JSON here."),
) -> None:
    """Answer closed questions (yes/no, multiple choice) about images; accuracy per question type.

    RUN: a CLIP run directory. DATA: a labelled dataset (questions are generated from its labels), or with
    --questions the folder holding the questions' images.
    """
    from medfm.tasks.vlm.commands import vqa_run

    res = vqa_run(run, data, questions, method, split, prompts, reports_split, out)
    _print_json({k: v for k, v in res.items() if k != "answers"})


def register(app: typer.Typer) -> None:
    """Add the vision-language commands to the main app."""
    app.command("clip")(clip)
    app.command("zeroshot")(zeroshot)
    app.command("retrieve")(retrieve)
    app.command("report")(report)
    app.command("vqa")(vqa)
