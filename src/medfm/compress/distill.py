"""Knowledge distillation: a classifier run (teacher) -> a registry encoder + linear head (student).

Loss = ``alpha`` * soft loss on temperature-softened teacher logits (softmax KL for multi-class, per-logit
sigmoid BCE for binary and multi-label; both times T^2) + (1 - ``alpha``) * the hard-label loss adapt uses.
Teacher logits are computed once over the (unaugmented) train images, so the student trains without
augmentation. AdamW, 10 % warm-up then cosine decay.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medfm.compress.common import (
    HeadModel,
    data_entry,
    load_teacher,
    macs_params,
    model_inputs,
    progress,
    split_arrays,
    test_auroc,
    val_threshold,
)
from medfm.errors import ConfigError
from medfm.tasks.adapt.classifier import Classifier, save_classifier


def soft_loss(student: torch.Tensor, teacher: torch.Tensor, task: str, temperature: float) -> torch.Tensor:
    """Distillation loss on head-convention logits (binary: one logit), scaled by T^2."""
    t = temperature
    if task == "multiclass":
        kl = F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean")
        return kl * t * t
    return F.binary_cross_entropy_with_logits(student / t, torch.sigmoid(teacher / t)) * t * t


@torch.no_grad()
def teacher_logits(teacher: Classifier, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    out = [teacher.head(teacher.embed(torch.as_tensor(images[i:i + batch_size]))).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def distill(teacher_run: str | Path, data: str | Path, out: str | Path, student: str | None = "resnet18",
            student_kwargs: dict[str, Any] | None = None, student_init: str | Path | None = None,
            steps: int = 500, temperature: float = 2.0, alpha: float = 0.5, batch_size: int = 32,
            lr: float = 1e-3, seed: int = 0) -> dict[str, Any]:
    """Distil the classifier run ``teacher_run`` into ``student`` (a registry encoder name; its input
    channels and size default to the teacher's) or the encoder run ``student_init``; save a classifier run
    in ``out``. Returns the summary written into its config."""
    from medfm.models.io import load_encoder
    from medfm.models.registry import create_encoder
    from medfm.tasks.adapt.finetune import head_outputs, loss_fn

    if temperature <= 0 or not 0 <= alpha <= 1 or steps < 1:
        raise ConfigError(f"need temperature > 0, 0 <= alpha <= 1, steps >= 1 (got {temperature}, {alpha}, "
                          f"{steps})")
    teacher = load_teacher(teacher_run)
    splits = split_arrays(data)
    torch.manual_seed(seed)
    kw = dict(student_kwargs or {})
    if student_init is not None:
        enc = load_encoder(student_init, **kw)
    else:
        kw.setdefault("in_chans", int(teacher.encoder.in_chans))
        kw.setdefault("img_size", teacher.encoder.img_size)
        enc = create_encoder(student or "resnet18", **kw)
    n_out = head_outputs(teacher.task, len(teacher.classes) or 1)
    model = HeadModel(enc, nn.Linear(int(enc.embed_dim), n_out))
    images, labels = splits["train"]
    t_logits = teacher_logits(teacher, images)
    x_all = model_inputs(images, enc)
    y_all = torch.as_tensor(np.asarray(labels))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    rng = np.random.default_rng(seed)
    bs, warm, order = min(batch_size, max(len(images), 1)), max(1, steps // 10), []
    model.train()
    bar = progress(steps, "distil")
    for step in range(steps):
        cos = 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        f = (step + 1) / warm if step < warm else cos
        for g in opt.param_groups:
            g["lr"] = lr * f
        if len(order) < bs:
            order += rng.permutation(len(images)).tolist()
        idx, order = order[:bs], order[bs:]
        z = model(x_all[idx])
        loss = alpha * soft_loss(z, t_logits[idx], teacher.task, temperature) \
            + (1 - alpha) * loss_fn(z, y_all[idx], teacher.task)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
    bar.close()
    clf = Classifier(model.encoder, model.head, teacher.task, teacher.classes, None, teacher.preprocessing,
                     "distill").eval()
    clf.threshold, rule = val_threshold(clf, splits.get("val"))
    t_macs, t_params = macs_params(teacher, teacher.encoder)
    s_macs, s_params = macs_params(clf, clf.encoder)
    t_auc, s_auc = test_auroc(teacher, *splits["test"]), test_auroc(clf, *splits["test"])
    summary = {"distilled_from": Path(teacher_run).name,
               "distillation": {"temperature": temperature, "alpha": alpha, "steps": steps, "lr": lr,
                                "student": enc.config.get("name"),
                                "student_init": Path(student_init).name if student_init else None},
               "teacher_auroc": t_auc, "student_auroc": s_auc, "teacher_macs": t_macs, "student_macs": s_macs,
               "teacher_params": t_params, "student_params": s_params}
    save_classifier(clf, out, threshold_rule=rule, seed=seed, data=data_entry(data, splits["train"]),
                    metrics={"test_auroc": s_auc, "teacher_test_auroc": t_auc}, extra=summary)
    return {**summary, "out": str(out), "model": clf}
