"""The medfm demo: phantom data -> prepare -> MAE pretraining -> few-label adaptation -> audit -> HTML report.

Each stage calls the library function behind a public medfm command (with that command's defaults), so
the demo doubles as an integration check of the whole toolkit. Stages whose outputs exist are skipped on a
re-run (pretraining resumes from its checkpoint), so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from medfm.errors import ConfigError, InputError, MedfmError


@dataclass
class DemoConfig:
    """Sizes of every stage; ``fast()`` and ``tiny()`` are smaller presets."""

    out: Path = Path("demo_out")
    data: str | None = None  # a prepared dataset, or medmnist:NAME; None = generate phantom chest X-rays
    n_cases: int = 600
    phantom_size: int = 128
    img_size: int = 64
    patch_size: int = 8
    encoder: str = "vit_tiny"
    # a ViT-Tiny narrowed to 128 dims and 4 blocks: pretrains in minutes on a laptop CPU
    encoder_args: str = '{"depth": 4, "embed_dim": 128, "num_heads": 4}'
    # bf16 on a quiet 2-core CPU: 2000 steps -> linear probe AUROC 0.711 at 100 % (2:45 wall),
    # 4000 steps -> 0.776 (4:59 wall); measured 2026-12-05, see README "Demo"
    pretrain_steps: int = 4000
    pretrain_batch: int = 48
    # "auto": bf16-mixed where this machine computes bf16 natively (CPU AVX512-BF16/AMX, bf16 GPUs), else 32
    precision: str = "auto"
    methods: str = "linear,knn,prototype,lora,scratch"
    fractions: str = "0.05,0.25,1.0"
    shots: str = ""
    seeds: int = 2
    adapt_steps: int = 0  # > 0: fixed steps for lora/scratch; 0: adapt_epochs clamped to [min, max] steps
    # small on purpose: the whole demo must fit in ~10 minutes on a 2-core laptop (measured: demo_timings)
    adapt_epochs: float = 5.0
    adapt_min_steps: int = 80
    adapt_max_steps: int = 120
    adapt_batch: int = 32
    # the audit of the saved model: site shift, fairness, calibration, explanations (one label of a
    # multi-label model; the first label when this one is not among them)
    audit: bool = True
    audit_label: str = "effusion"
    audit_boot: int = 200
    audit_explain: int = 4

    @classmethod
    def fast(cls, **kw) -> DemoConfig:
        """About a minute or two: fewer cases, a shallower encoder, fewer steps and one seed."""
        return replace(cls(n_cases=240, encoder_args='{"depth": 2, "embed_dim": 128, "num_heads": 4}',
                           pretrain_steps=80, pretrain_batch=32, fractions="0.1,0.3,1.0", seeds=1,
                           adapt_min_steps=20, adapt_max_steps=30), **kw)

    @classmethod
    def tiny(cls, **kw) -> DemoConfig:
        """Seconds: for the integration test."""
        return replace(cls(n_cases=48, phantom_size=64, img_size=32,
                           encoder_args='{"depth": 1, "embed_dim": 32, "num_heads": 2}',
                           pretrain_steps=2, pretrain_batch=8, methods="linear,prototype,lora,scratch",
                           fractions="0.5,1.0", seeds=1, adapt_steps=2, adapt_batch=8, audit_boot=20,
                           audit_explain=2), **kw)


def _prepare(src: str | Path, out: Path, size: int) -> Path:
    """`medfm data prepare SRC --out OUT --size SIZE` as a library call (same defaults)."""
    from medfm.data.prepare import PrepareConfig, prepare

    summary = prepare(src, out, PrepareConfig(size=size), progress=False)
    if summary["n_cases"] == 0:
        first = summary["skipped"][0]["error"] if summary["skipped"] else "no cases in the source"
        raise InputError(src, f"no case could be prepared ({summary['n_skipped']} skipped; first: {first})")
    return out


def stage_data(cfg: DemoConfig) -> Path:
    """A prepared dataset: the user's, an imported MedMNIST subset, or generated phantom chest X-rays."""
    from medfm.data.summary import load_summary

    if cfg.data and not cfg.data.startswith("medmnist:"):
        p = Path(cfg.data)
        if not (p / "summary.json").is_file():
            raise ConfigError(f"--data {p}: not a prepared dataset (run `medfm data prepare` first) "
                              "or medmnist:NAME")
        load_summary(p)  # a damaged summary is refused here, in one line, not deep in a later stage
        return p
    prepared = cfg.out / "prepared"
    if (prepared / "summary.json").is_file() and load_summary(prepared).n_cases > 0:
        return prepared  # an earlier run finished this stage
    if cfg.data:  # medmnist:NAME
        return _prepare(cfg.data, prepared, cfg.img_size)
    from medfm.data.phantom import write_phantom

    phantom = cfg.out / "phantom"
    if not (phantom / "manifest.csv").is_file():
        write_phantom("cxr", cfg.n_cases, phantom, size=cfg.phantom_size)
    return _prepare(phantom, prepared, cfg.img_size)


def demo_precision(cfg: DemoConfig) -> str:
    from medfm.train.precision import auto_precision

    return auto_precision() if cfg.precision == "auto" else cfg.precision


def stage_pretrain(cfg: DemoConfig, data: Path) -> Path:
    """MAE pretraining on the training split's images (labels unused); resumes from its checkpoint."""
    from medfm.train.config import PretrainConfig
    from medfm.train.trainer import run_pretrain

    run = cfg.out / "pretrain"
    if (run / "model.safetensors").is_file() and (run / "metrics.json").is_file():
        return run
    try:
        enc_kw = json.loads(cfg.encoder_args) if cfg.encoder_args else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"encoder_args is not valid JSON: {e}") from None
    pcfg = PretrainConfig(objective="mae", data=[str(data)], out=str(run), encoder=cfg.encoder,
                          img_size=cfg.img_size, patch_size=cfg.patch_size, encoder_kwargs=enc_kw,
                          steps=cfg.pretrain_steps, batch_size=cfg.pretrain_batch, workers=0,
                          precision=demo_precision(cfg),
                          ckpt_every=max(50, cfg.pretrain_steps))
    # the demo shows one display per stage; the trainer's own progress bar stays off
    return run_pretrain(pcfg, progress=False)


def stage_adapt(cfg: DemoConfig, run: Path, data: Path, progress=None):
    import medfm
    from medfm.tasks.adapt import AdaptConfig, parse_budgets, run_adapt

    acfg = AdaptConfig(methods=[m.strip() for m in cfg.methods.split(",") if m.strip()],
                       budgets=parse_budgets(cfg.fractions, cfg.shots), seeds=cfg.seeds,
                       steps=cfg.adapt_steps, epochs=cfg.adapt_epochs, min_steps=cfg.adapt_min_steps,
                       max_steps=cfg.adapt_max_steps, batch_size=cfg.adapt_batch, knn_k=10,
                       precision=demo_precision(cfg))
    encoder = medfm.load_encoder(run)
    return run_adapt(encoder, data, cfg.out / "adapt", acfg, source=str(run), progress=progress)


def stage_audit(cfg: DemoConfig, data: Path, progress=None) -> Path | None:
    """`medfm audit OUT/adapt/model DATA` as a library call: the saved model, audited on its own data
    (shift between its sites, fairness by sex / age / site, calibration, explanations with sanity checks)."""
    from medfm.audit.run import AuditConfig, run_audit
    from medfm.rundir import open_run

    model = cfg.out / "adapt" / "model"
    if not (model / "config.json").is_file():
        return None  # no method of this run keeps a model (e.g. kNN only): nothing to audit
    conf = open_run(model).config()
    label = None
    if conf.get("task") == "multilabel":
        classes = [str(c) for c in conf.get("classes") or []]
        label = cfg.audit_label if cfg.audit_label in classes else classes[0]
    acfg = AuditConfig(label=label, n_boot=cfg.audit_boot, n_perm=cfg.audit_boot, n_explain=cfg.audit_explain)
    run_audit(model, [data], cfg.out / "audit", acfg, progress=progress)
    return cfg.out / "audit" / "audit.html"


def stage_report(cfg: DemoConfig, data: Path, minutes: float) -> Path:
    from medfm.eval.adapt_report import build_adapt_report

    source = "generated phantom chest X-rays (5 findings, 3 sites)" if not cfg.data else cfg.data
    intro = (f"medfm demo: a {cfg.encoder} encoder was pretrained with a masked autoencoder "
             f"({cfg.pretrain_steps} steps) on the unlabelled training images of {source}, then adapted "
             f"with few labels by several methods and compared with the same architecture trained from "
             f"scratch. Everything ran on this machine in {minutes:.1f} minutes, in "
             f"{'bf16 mixed precision' if demo_precision(cfg) == 'bf16-mixed' else 'fp32'} "
             f"(precision '{demo_precision(cfg)}').")
    if (cfg.out / "audit" / "audit.html").is_file():
        intro += (" The saved model's trust audit (shift between sites, fairness, calibration, explanations "
                  "with sanity checks) is in audit/audit.html.")
    return build_adapt_report(cfg.out / "adapt", cfg.out / "report.html",
                              title="medfm demo: label efficiency", intro=intro)


def serve_command(cfg: DemoConfig, data: Path | None = None) -> str | None:
    """The command that serves the demo's saved model (with its OOD score fitted on the demo data) and
    prints the viewer's address; None when no method kept a model."""
    import shlex

    model = cfg.out / "adapt" / "model"
    if not (model / "config.json").is_file():
        return None
    ref = f" --ood-reference {shlex.quote(str(data))}" if data is not None else ""
    return f"medfm serve {shlex.quote(str(model))}{ref} --port 8000"


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print, progress=None) -> Path:
    """Run every stage and return the report path. ``progress``: optional rich Progress."""
    from medfm.rundir import write_json

    cfg.out.mkdir(parents=True, exist_ok=True)
    write_json(cfg.out / "demo_config.json", {k: str(v) for k, v in asdict(cfg).items()})
    t_start = time.perf_counter()
    stages = progress.add_task("demo", total=4 + int(cfg.audit)) if progress else None
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def step(name: str, fn, *a, **kw):
        if progress:
            progress.update(stages, description=f"demo: {name}")
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            out = fn(*a, **kw)
        except MedfmError:
            raise
        timings[name] = round(time.perf_counter() - t0, 1)
        # CPU seconds of this process: on a shared machine this tells what the stage costs when idle
        cpu[name] = round(time.process_time() - c0, 1)
        log(f"✓ {name} ({timings[name]:.0f} s)")
        if progress:
            progress.advance(stages)
        return out

    data = step("data (phantom + prepare)", stage_data, cfg)
    run = step("MAE pretraining", stage_pretrain, cfg, data)
    step("adaptation (probe, kNN, prototypes, LoRA, scratch)", stage_adapt, cfg, run, data, progress)
    if cfg.audit:
        step("audit (site shift, fairness, calibration, explanations)", stage_audit, cfg, data, progress)
    report = step("report", stage_report, cfg, data, (time.perf_counter() - t_start) / 60)
    timings["total"] = round(time.perf_counter() - t_start, 1)
    timings["cpu_s"] = {**cpu, "total": round(sum(cpu.values()), 1)}
    write_json(cfg.out / "demo_timings.json", timings)
    cmd = serve_command(cfg, data)
    if cmd:
        log(f"Serve this model and open the viewer: {cmd}  (then open the Viewer address it prints)")
    return report
