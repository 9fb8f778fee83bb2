"""Structured pruning of a classifier run with Torch-Pruning, then a short fine-tune.

Channels are ranked by L2 magnitude (``MagnitudeImportance(p=2)``) and removed with their whole dependency
group (Torch-Pruning's ``MetaPruner``), uniformly per layer or globally; the head's outputs are never
pruned. The ratio is searched (bisection) until the measured MACs drop by at least the target.
CNNs (ResNet, ConvNeXt): every conv / linear channel group. ViTs: only the MLP hidden width
(``blocks.N.mlp.fc1`` outputs / ``fc2`` inputs): medfm's ``Attention`` reshapes with the input width and
a fixed ``num_heads``, so pruning heads, head dims or the embedding width would break its forward.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medfm.compress.common import (
    HeadModel,
    data_entry,
    example_input,
    load_teacher,
    macs_params,
    split_arrays,
    test_auroc,
    val_threshold,
)
from medfm.errors import ConfigError
from medfm.tasks.adapt.classifier import Classifier, save_classifier


def _ignored(model: HeadModel) -> list[nn.Module]:
    if getattr(model.encoder, "family", "cnn") == "cnn":
        return [model.head]
    keep = [m for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d | nn.Conv3d)
            and not n.endswith("mlp.fc1")]
    return keep


def prune_once(model: HeadModel, ratio: float, global_pruning: bool = False) -> HeadModel:
    """A pruned copy of ``model`` at channel ratio ``ratio`` (L2 magnitude)."""
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    if ratio <= 0:
        return m
    x = example_input(m.encoder).to(next(m.parameters()).device)
    with warnings.catch_warnings():  # cls / position tokens: not in any pruned group here
        warnings.simplefilter("ignore", UserWarning)
        pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=ratio, global_pruning=global_pruning,
                                      ignored_layers=_ignored(m))
        pruner.step()
    _sync_attrs(m.encoder, m.head)
    return m


def _sync_attrs(encoder: nn.Module, head: nn.Module) -> None:
    """Keep ``embed_dim`` (and a ResNet's ``feature_dims``) true to the pruned shapes."""
    if isinstance(head, nn.Linear):
        encoder.embed_dim = int(head.in_features)
    stages = getattr(encoder, "stages", None)
    if isinstance(stages, nn.ModuleList) and getattr(encoder, "feature_dims", None):
        dims = []
        for st in stages:
            convs = [mm for mm in st.modules() if isinstance(mm, nn.Conv2d | nn.Conv3d)]
            dims.append(int(convs[-1].out_channels) if convs else 0)
        # the last conv of a stage may be a shortcut; every block's output width is the same
        encoder.feature_dims = dims


def search_ratio(model: HeadModel, target: float, global_pruning: bool = False, iters: int = 8
                 ) -> tuple[HeadModel, float, int]:
    """(pruned model, ratio, MACs) with the smallest ratio whose MACs reduction >= ``target``."""
    m0, _ = macs_params(model, model.encoder)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(iters):
        r = (lo + hi) / 2
        cand = prune_once(model, r, global_pruning)
        macs, _ = macs_params(cand, cand.encoder)
        if 1 - macs / m0 >= target:
            best, hi = (cand, r, macs), r
        else:
            lo = r
    if best is None:
        cand = prune_once(model, hi, global_pruning)
        macs, _ = macs_params(cand, cand.encoder)
        if 1 - macs / m0 < target:
            raise ConfigError(f"pruning cannot reach a {target:.0%} MACs reduction "
                              f"(best {1 - macs / m0:.0%})")
        best = (cand, hi, macs)
    return best


def prune_classifier(run_dir: str | Path, data: str | Path, out: str | Path,
                     target_macs_reduction: float = 0.25, finetune_steps: int = 200, batch_size: int = 32,
                     lr: float = 1e-4, seed: int = 0, global_pruning: bool = False) -> dict[str, Any]:
    """Prune the classifier run ``run_dir`` to >= ``target_macs_reduction`` fewer MACs, fine-tune it for
    ``finetune_steps`` on ``data``'s train split (adapt's loop; best val AUROC kept), and save it as a
    classifier run in ``out``. Returns the summary written into its config."""
    from medfm.tasks.adapt.finetune import train_classifier

    if not 0 < target_macs_reduction < 1:
        raise ConfigError(f"target MACs reduction must be in (0, 1), got {target_macs_reduction}")
    src = load_teacher(run_dir)
    if not isinstance(src.head, nn.Linear):
        raise ConfigError(f"pruning needs a linear head; this run's head is "
                          f"{type(src.head).__name__} (method '{src.method}')")
    splits = split_arrays(data)
    test = splits["test"]
    torch.manual_seed(seed)
    base = HeadModel(src.encoder, src.head).eval()
    macs0, params0 = macs_params(base, base.encoder)
    auc0 = test_auroc(src, *test)
    pruned, ratio, macs1 = search_ratio(base, target_macs_reduction, global_pruning)
    info: dict[str, Any] = {"steps_run": 0}
    if finetune_steps > 0:
        info = train_classifier(pruned, [{"params": list(pruned.parameters()), "lr": lr}], *splits["train"],
                                src.task, finetune_steps, batch_size, seed, weight_decay=0.0,
                                use_augment=False, val=splits.get("val"))
    pruned.eval()
    clf = Classifier(pruned.encoder, pruned.head, src.task, src.classes, src.threshold, src.preprocessing,
                     src.method).eval()
    thr, rule = val_threshold(clf, splits.get("val"))
    clf.threshold = thr
    auc1 = test_auroc(clf, *test)
    _, params1 = macs_params(pruned, pruned.encoder)
    summary = {"pruned_from": Path(run_dir).name, "pruning": {
        "method": "torch_pruning MetaPruner, L2 magnitude", "global": bool(global_pruning),
        "ratio": float(ratio), "target_macs_reduction": float(target_macs_reduction),
        "scope": "mlp hidden" if getattr(pruned.encoder, "family", "cnn") != "cnn" else "all channels",
        "finetune_steps": int(info.get("steps_run", 0)), "lr": lr},
        "pruned_shapes": {"embed_dim": int(pruned.encoder.embed_dim),
                          "feature_dims": list(getattr(pruned.encoder, "feature_dims", []) or [])},
        "macs_before": macs0, "macs_after": macs1, "params_before": params0, "params_after": params1,
        "macs_reduction": 1 - macs1 / macs0, "auroc_before": auc0, "auroc_after": auc1}
    save_classifier(clf, out, threshold_rule=rule, seed=seed, data=data_entry(data, splits["train"]),
                    metrics={"test_auroc": auc1, "test_auroc_before": auc0}, extra=summary)
    summary["out"] = str(out)
    summary["model"] = clf
    return summary


