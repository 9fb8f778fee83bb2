"""CLI: `medfm audit` — the trust audit of a classifier on one or more prepared datasets."""

from __future__ import annotations

import re
from pathlib import Path

import typer

_HELP = """Audit a classifier before it touches a patient: writes OUT/audit.json and a self-contained
OUT/audit.html a clinician can read (flags first).

MODEL is a classifier run (`medfm adapt` saves one as OUT/model; a multi-label one is audited one --label
at a time) or a CLIP run (`medfm clip`), audited as the zero-shot classifier of the finding --label. DATA
are prepared datasets (`medfm
data prepare`): the first is the reference, the model's own data (its train split fits the OOD model, its
val split the thresholds and the temperature, its test split is the internal evaluation); every further
one is a target (another site or hospital, a new batch), all of whose cases are evaluated. A dataset
without labels is audited as a monitor: shift and OOD only.

cross-site: AUROC, sensitivity, specificity and ECE per dataset and site with patient-level bootstrap
CIs, and the internal-to-external drop; --per-site adds a train-site x test-site matrix of per-site
models.

shift: MMD permutation test, per-dimension KS with Bonferroni, domain-classifier and model-output tests
between the reference and each target and between sites, with the cases needed to detect the shift.

ood: Mahalanobis, kNN and energy scores, thresholds on reference validation cases, the share flagged and
the most atypical cases.

fairness: per group of each attribute AUROC, FNR (underdiagnosis), FPR and ECE with CIs, gaps to the
largest group, equalized-odds and demographic-parity differences; small groups flagged, not ranked.

calibration: temperature scaling fitted on reference validation cases, ECE and reliability before and
after, per group.

explanations: saliency maps with the cascading randomisation test, and localisation against masks.

shortcuts: site, sex and age predicted from the embeddings; AUROC with the anatomy blanked where the
store has masks.

mitigation: with --tent, BN re-estimation and TENT on each target, kept only if the source AUROC stays
within 0.01."""
# paragraphs are separated by blank lines; single line breaks are only source wrapping
HELP = re.sub(r"(?<!\n)\n(?!\n)", " ", _HELP)


def audit(
    model: Path = typer.Argument(..., help="Classifier run directory (`medfm adapt` OUT/model) or a CLIP "
                                 "run (zero-shot, with --label)."),
    data: list[Path] = typer.Argument(..., help="Prepared datasets; the first is the reference."),
    out: Path = typer.Option(..., "--out", "-o", help="Output run directory (audit.json, audit.html, "
                             "figures/)."),
    attributes: str = typer.Option("sex,age,site", help="Comma-separated manifest columns to compare "
                                   "groups by (age is banded 0-17, 18-39, 40-59, 60-79, 80+)."),
    explain: str = typer.Option("", help="Saliency methods, comma-separated: gradcam, gradcam++, rollout, "
                                "ig (integrated gradients), occlusion. Default: by encoder (Grad-CAM for "
                                "CNNs, rollout for ViTs) plus ig."),
    n_explain: int = typer.Option(8, help="Reference test cases to explain (0: no explanations)."),
    per_site: bool = typer.Option(False, "--per-site", help="Train a linear probe per site (train splits) "
                                  "for the train-site x test-site matrix."),
    tent: bool = typer.Option(False, "--tent", help="Try test-time BN re-estimation and TENT on each "
                              "target, measured before / after."),
    min_group: int = typer.Option(30, help="Groups with fewer cases are flagged, not ranked."),
    n_boot: int = typer.Option(200, help="Bootstrap resamples (patients) for the CIs."),
    n_perm: int = typer.Option(200, help="Permutations of the MMD shift test."),
    seed: int = typer.Option(0, help="Random seed (bootstrap, permutations, case choice)."),
    label: str = typer.Option("", help="For a multi-label classifier: the label (finding) to audit; "
                              "each label is audited on its own, with its own threshold. For a CLIP run: "
                              "the finding whose zero-shot classifier is audited."),
    prompts: str = typer.Option("", help="CLIP runs: zero-shot prompts (default, attributes, or a JSON "
                                "file as for `medfm zeroshot`)."),
    threads: int = typer.Option(0, help="Torch CPU threads (0: leave the default)."),
) -> None:
    import torch

    from medfm.audit.run import AuditConfig, run_audit
    from medfm.cli.adapt import progress_bar

    if threads > 0:
        torch.set_num_threads(threads)
    cfg = AuditConfig(attributes=[a.strip() for a in attributes.split(",") if a.strip()],
                      explain=[m.strip() for m in explain.split(",") if m.strip()] or None,
                      n_explain=n_explain, n_boot=n_boot, n_perm=n_perm, min_group=min_group,
                      per_site=per_site, tent=tent, seed=seed, label=label or None,
                      prompts=prompts or None)
    with progress_bar() as p:
        doc = run_audit(model, list(data), out, cfg, progress=p)
    for name, d in doc["datasets"].items():
        typer.echo(f"{name}: {d['role']}, {d['mode']}, {d['n_evaluated']} cases evaluated")
    findings = doc.get("findings") or []
    typer.echo(f"Findings ({len(findings)}):" if findings else "Findings: none raised")
    for f in findings:
        typer.echo(f"  - {f}")
    typer.echo(f"Report: {Path(out) / 'audit.html'}")
    typer.echo(f"Audit: {Path(out) / 'audit.json'}")


audit.__doc__ = HELP


def register(app: typer.Typer) -> None:
    """Add `audit` to the main app."""
    app.command(name="audit", help=HELP)(audit)
