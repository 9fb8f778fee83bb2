"""The segmentation commands as library functions (the CLI parses, calls one of these, prints).

Evaluation never writes into the model's run directory: results go to a separate ``out`` folder (issue 16,
item 15), so a trained run stays byte-for-byte what training wrote.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from medfm.errors import ConfigError
from medfm.rundir import write_json


def _roi(conf: dict) -> list[int] | None:
    patch, size = conf.get("patch"), conf.get("img_size")
    if conf.get("spatial_dims") == 2 and size and patch and list(patch) == [size, size]:
        return None
    return patch


def _pairs_for_run(conf: dict, data: str | Path, split: str | None, site: str | None, size: int | None):
    """A dataset's pairs, raw manifest files preprocessed as the run's training images were."""
    from medfm.tasks.segment.data import load_pairs
    from medfm.tasks.segment.runs import preprocessing

    return load_pairs(data, split, site, size, spec=preprocessing(conf))


def hd95_unit(pairs) -> str:
    """ "mm" when every case has a physical spacing (NIfTI, DICOM), else "px" (PNGs, prepared 2D stores)."""
    known = pairs.spacing_known
    return "mm" if known and all(known) else "px"


def evaluate_run(
    run: str | Path,
    data: str | Path,
    split: str = "test",
    site: str | None = None,
    tolerance_mm: float = 2.0,
    keep_components: int | None = None,
    fill_holes: bool = False,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Dice / HD95 / surface Dice of a segmenter run on a dataset; written to ``out`` (never into ``run``).

    ``out`` gets metrics.json ({"run", "data", key: results}) and a README.md card of the run with these
    metrics. Each class's dict says ``hd95_unit`` ("mm", or "px" when the images carry no spacing)."""
    from medfm.tasks.segment.infer import evaluate_model
    from medfm.tasks.segment.runs import load_segmentation_run

    model, conf = load_segmentation_run(run)
    pairs = _pairs_for_run(conf, data, None if split == "all" else split, site, conf.get("img_size"))
    res = evaluate_model(
        model,
        pairs,
        conf["num_classes"],
        roi_size=_roi(conf),
        class_names=conf["class_names"],
        tolerance_mm=tolerance_mm,
        keep_components=keep_components,
        fill_holes=fill_holes,
    )
    unit = hd95_unit(pairs)
    for m in res.values():
        m["hd95_unit"] = unit
    key = f"eval_{split}" + (f"_{site}" if site else "") + ("_pp" if keep_components or fill_holes else "")
    if out is not None:
        write_evaluation(run, out, {"data": str(data), key: res})
    return {key: res}


def write_evaluation(run: str | Path, out: str | Path, results: dict[str, Any]) -> Path:
    """``out``/metrics.json (merged with an earlier evaluation there) and ``out``/README.md: the run's card
    with these results. The run directory is only read."""
    from medfm.modelcard.common import LIMITATIONS, SECTIONS, header, how_to_load
    from medfm.rundir import RunDir

    src, out = RunDir(run), Path(out)
    prev = RunDir(out).metrics() if (out / "metrics.json").is_file() else {}
    metrics = {**prev, "run": str(run), **results}
    write_json(out / "metrics.json", metrics)
    conf, kind = src.config(), src.kind
    text = "\n".join(
        part.rstrip() + "\n"
        for part in (
            header(kind, conf, src.path),
            f"Evaluation of the run `{src.path.name}` by `medfm segment`; the run is unchanged.",
            SECTIONS.get(kind)(conf, {**src.metrics(), **metrics}),
            how_to_load(kind, src.path),
            LIMITATIONS,
        )
    )
    (out / "README.md").write_text(text)
    return out


def predict_run(
    run: str | Path,
    data: str | Path,
    out: str | Path,
    split: str = "test",
    overlays: bool = True,
    keep_components: int | None = None,
    fill_holes: bool = False,
) -> int:
    """Masks aligned with the inputs (PNG 2D / NIfTI 3D with the input affine), overlays and report.html in
    ``out``; returns the number of cases."""
    import torch.nn.functional as F

    from medfm.tasks.segment.infer import predict_pairs
    from medfm.tasks.segment.io import write_mask_nifti, write_mask_png, write_overlay_png, write_report
    from medfm.tasks.segment.metrics import segmentation_metrics
    from medfm.tasks.segment.runs import load_segmentation_run

    out, run = Path(out), Path(run)
    model, conf = load_segmentation_run(run)
    pairs = _pairs_for_run(conf, data, None if split == "all" else split, None, conf.get("img_size"))
    preds = predict_pairs(model, pairs, _roi(conf), keep_components=keep_components, fill_holes=fill_holes)
    unit = hd95_unit(pairs)
    rows, pngs = [], []
    for i, (case, p) in enumerate(zip(pairs.case_ids, preds)):
        cid = case.replace("/", "_")  # prepared case ids may look like paths
        m = segmentation_metrics(p[None], pairs.native_masks[i][None], conf["num_classes"], pairs.spacing[i])
        rows.append({"case": cid, "dice": m["mean"]["dice"], f"hd95_{unit}": m["mean"]["hd95_mm"]})
        if p.ndim == 3:
            write_mask_nifti(p, out / f"{cid}_mask.nii.gz", pairs.affines[i] if pairs.affines else None)
            continue
        write_mask_png(p, out / f"{cid}_mask.png")
        if overlays:
            img = F.interpolate(pairs.images[i : i + 1], size=tuple(p.shape), mode="bilinear")[0]
            pngs.append(
                write_overlay_png(img, p, out / f"{cid}_overlay.png", reference=pairs.native_masks[i])
            )
    summary = {"run": str(run), "data": str(data), "split": split, "decoder": conf["decoder"]}
    write_report(out / "report.html", f"Segmentation: {run.name}", rows, pngs, summary)
    return len(preds)


def prompt_image(
    model_path: str | Path,
    image: str | Path,
    out: str | Path,
    boxes: list[list[float]] | None = None,
    points: list[list[float]] | None = None,
) -> int:
    """Box / point prompts on one raw image -> mask PNG ``out`` (+ ``*_overlay.png``); returns the mask's
    pixel count. The image goes through the run's recorded preprocessing (SAM files: prepare's defaults at
    the model's input size); prompts are in pixels of the input image."""
    from medfm.tasks.segment.io import write_mask_png, write_overlay_png
    from medfm.tasks.segment.prompts import prompt_file
    from medfm.tasks.segment.runs import load_promptable, preprocessing, run_config

    if not (boxes or points):
        raise ConfigError("give at least one --box or --point")
    net = load_promptable(model_path)
    p = Path(model_path)
    conf = run_config(p, "promptable") if p.is_dir() else {"img_size": int(net.img_size)}
    mask, img = prompt_file(net, image, preprocessing(conf), boxes, points)
    out = Path(out)
    write_mask_png(mask.long(), out)
    write_overlay_png(img, mask.long(), out.with_name(out.stem + "_overlay.png"))
    return int(mask.sum())


def evaluate_prompts(
    model_path: str | Path, data: str | Path, split: str = "test", site: str | None = None
) -> dict:
    """Box-prompt Dice (one box per object, simulated from the reference masks) on a dataset."""
    from medfm.tasks.segment.data import load_pairs
    from medfm.tasks.segment.prompts import evaluate_box_prompts
    from medfm.tasks.segment.runs import load_promptable, preprocessing, run_config

    net = load_promptable(model_path)
    size = int(net.img_size)
    p = Path(model_path)
    spec = preprocessing(run_config(p, "promptable")) if p.is_dir() else None
    pairs = load_pairs(data, None if split == "all" else split, site, size, spec=spec)
    return evaluate_box_prompts(net, pairs.images, pairs.masks)


# the config fields each trainer takes as keyword arguments of the same name
_PROMPT_TRAIN_OPTIONS = (
    "steps", "batch_size", "lr", "jitter", "correction_rounds", "seed", "encoder_lr_scale"
)
_INCONTEXT_OPTIONS = ("steps", "batch_size", "lr", "task_augment")


def _options(cfg: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {n: getattr(cfg, n) for n in names}


def _save_trained(
    net: torch.nn.Module,
    kind: str,
    cfg: Any,
    pairs: Any,
    hist: list[float],
    out: str | Path,
    head: dict[str, Any],
    tail: dict[str, Any] | None = None,
) -> Path:
    """Write a trained promptable / in-context model: ``head`` (its architecture), the training options, the
    preprocessing its images went through (replayed at inference), ``tail`` and the final loss."""
    from medfm.tasks.segment.runs import save_run

    conf = {**head, "train": asdict(cfg), "preprocessing": pairs.spec, **(tail or {}),
            "final_loss": hist[-1] if hist else None}
    return save_run(net, kind, conf, out)


@dataclass
class PromptTrainConfig:
    """Options of `medfm segment prompt-train` (architecture sizes included, so a run rebuilds from them)."""

    data: str = ""
    encoder: str = "vit_tiny"
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 128
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    encoder_lr_scale: float = 0.1
    prompt_dim: int = 128  # width of prompt embeddings and mask decoder (SAM: 256)
    decoder_heads: int | None = None  # default: 8 when prompt_dim % 16 == 0, else 2
    jitter: float = 0.1
    correction_rounds: int = 0
    split: str = "train"
    seed: int = 0
    progress: bool = True


def train_promptable_run(cfg: PromptTrainConfig, out: str | Path) -> Path:
    """Train a SAM-style promptable model on simulated prompts and write a "promptable" run."""
    from medfm.models.seg.sam import build_promptable
    from medfm.tasks.segment.data import load_pairs
    from medfm.tasks.segment.prompts import train_promptable_steps
    from medfm.tasks.segment.train import make_encoder

    pairs = load_pairs(cfg.data, cfg.split, None, cfg.img_size)
    enc = make_encoder(cfg.encoder, 2, int(pairs.images.shape[1]), [cfg.img_size] * 2, **cfg.encoder_kwargs)
    heads = cfg.decoder_heads or (8 if cfg.prompt_dim % 16 == 0 else 2)
    torch.manual_seed(cfg.seed)
    net = build_promptable(
        enc,
        cfg.img_size,
        prompt_dim=cfg.prompt_dim,
        decoder_heads=heads,
        decoder_mlp_dim=4 * cfg.prompt_dim,
        iou_head_hidden_dim=cfg.prompt_dim,
    )
    hist = train_promptable_steps(
        net, pairs.images, pairs.masks, **_options(cfg, _PROMPT_TRAIN_OPTIONS), progress=cfg.progress
    )
    head = {"model": net.config, "img_size": cfg.img_size}
    return _save_trained(net, "promptable", cfg, pairs, hist, out, head, {"n_train": len(pairs)})


@dataclass
class IncontextConfig:
    """Options of `medfm segment incontext` training, architecture sizes included (the benchmark's model,
    vit_tiny with patch_size 8 / embed_dim 96 / depth 4, is buildable from the CLI)."""

    data: str = ""
    train_labels: list[int] = field(default_factory=list)
    encoder: str = "vit_tiny"
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)  # depth, patch_size, embed_dim, num_heads
    img_size: int = 128
    dim: int = 64  # width of the reference-conditioned decoder
    feature_size: int = 16
    prior: str = "knn"  # knn | prototype
    steps: int = 300
    batch_size: int = 4
    lr: float = 1e-3
    task_augment: float = 0.5
    progress: bool = True


def train_incontext_run(cfg: IncontextConfig, out: str | Path) -> Path:
    """Episodic training on ``cfg.train_labels`` of the dataset's 'train' split -> an "incontext" run."""
    from medfm.models.seg.incontext import IncontextSegmenter
    from medfm.tasks.segment.data import load_pairs
    from medfm.tasks.segment.incontext import train_incontext
    from medfm.tasks.segment.train import make_encoder

    if cfg.prior not in ("knn", "prototype"):
        raise ConfigError(f"--prior must be 'knn' or 'prototype', got {cfg.prior!r}")
    train = load_pairs(cfg.data, "train", None, cfg.img_size)
    nd = train.images.ndim - 2
    enc = make_encoder(
        cfg.encoder, nd, int(train.images.shape[1]), list(train.images.shape[2:]), **cfg.encoder_kwargs
    )
    net = IncontextSegmenter(enc, dim=cfg.dim, feature_size=cfg.feature_size, prior=cfg.prior)
    hist = train_incontext(
        net, train.images, train.masks, cfg.train_labels, **_options(cfg, _INCONTEXT_OPTIONS),
        progress=cfg.progress,
    )
    arch = _options(cfg, ("dim", "feature_size", "prior", "img_size", "train_labels"))
    head = {"encoder": enc.config, **arch}
    return _save_trained(net, "incontext", cfg, train, hist, out, head)


def evaluate_incontext_run(
    run: str | Path,
    data: str | Path,
    test_labels: list[int],
    ks: list[int],
    out: str | Path | None = None,
) -> dict[str, dict[str, float]]:
    """Dice on held-out labels with k references ('train' split) per query ('test' split), no weight update.

    Results go to ``out``/metrics.json; the run directory is only read."""
    from medfm.tasks.segment.data import load_pairs
    from medfm.tasks.segment.incontext import evaluate_incontext
    from medfm.tasks.segment.runs import load_incontext_run, preprocessing, run_img_size

    net, conf = load_incontext_run(run)
    size, spec = run_img_size(conf), preprocessing(conf)
    ref = load_pairs(data, "train", None, size, spec=spec)
    test = load_pairs(data, "test", None, size, spec=spec)
    res = {
        f"k{k}": evaluate_incontext(
            net, test.images, test.masks, test_labels, k, ref_images=ref.images, ref_masks=ref.masks
        )
        for k in ks
    }
    if out is not None:
        write_evaluation(run, out, {"data": str(data), "incontext_eval": res})
    return res


def incontext_run(
    cfg: IncontextConfig | None,
    run: str | Path | None,
    data: str | Path,
    out: str | Path,
    test_labels: list[int] | None = None,
    ks: tuple[int, ...] | list[int] = (1, 5),
) -> tuple[Path, dict[str, dict[str, float]] | None]:
    """`medfm segment incontext`: train ``cfg`` into ``out`` (``cfg`` None: use the trained ``run``), then,
    with ``test_labels``, evaluate on them with each k in ``ks``. Returns (run, results or None).

    Evaluated right after training, the results are part of the new run's own record (its metrics.json);
    an existing run is only read and its evaluation goes to ``out``/metrics.json."""
    from medfm.rundir import RunDir

    if cfg is not None:
        run = train_incontext_run(cfg, out)
    if run is None:
        raise ConfigError("give a training config or a trained in-context run")
    if not test_labels:
        return Path(run), None
    res = evaluate_incontext_run(run, data, test_labels, list(ks), None if cfg is not None else out)
    if cfg is not None:
        RunDir(run, kind="incontext").write_metrics({"incontext_eval": res})
    return Path(run), res
