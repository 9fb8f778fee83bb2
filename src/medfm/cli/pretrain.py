"""CLI: `medfm pretrain mae|contrastive DATA ...` — self-supervised pretraining into a run directory.

One command per registered objective, all sharing the same options (objective-specific ones sit in their own
help panel), so a new objective in ``medfm.train`` appears here without CLI code.
"""

from __future__ import annotations

import json
from typing import Any

import typer

from medfm.errors import ConfigError

pretrain_app = typer.Typer(
    help="Self-supervised pretraining of an encoder on unlabeled prepared data (writes a run directory). "
    "Rerun the same command with the same --out to resume after an interruption.",
    no_args_is_help=True,
)

_ENC = "Encoder"
_OPT = "Optimisation"
_MAE = "MAE (mae only)"
_CON = "Contrastive (contrastive only)"
_HW = "Hardware and scale-out"


def _make_command(objective: str, doc: str) -> Any:
    def command(
        data: str = typer.Argument(
            ...,
            help="Prepared dataset directory (from `medfm data prepare`); several "
            "comma-separated directories are pooled.",
        ),
        out: str = typer.Option(
            "",
            "--out",
            help="Run directory to write (default runs/<objective>-<timestamp>). "
            "If it holds a checkpoint of the same run, training resumes from it. Give one for multi-node "
            "runs (a shared path every node sees).",
        ),
        split: str = typer.Option("train", help="Manifest split to train on ('all' for every image)."),
        encoder: str = typer.Option(
            "vit_tiny", help="Encoder name from `medfm models list`.", rich_help_panel=_ENC
        ),
        spatial_dims: int = typer.Option(
            2, help="2 for images, 3 for volumes (random --img-size crops).", rich_help_panel=_ENC
        ),
        img_size: int = typer.Option(
            64, help="Training input size in pixels/voxels per axis.", rich_help_panel=_ENC
        ),
        patch_size: int = typer.Option(
            8, help="ViT patch size (ignored by CNN encoders).", rich_help_panel=_ENC
        ),
        encoder_args: str = typer.Option(
            "", help="Extra encoder options as JSON, e.g. '{\"depth\": 6}'.", rich_help_panel=_ENC
        ),
        batch_size: int = typer.Option(64, help="Images per step per device.", rich_help_panel=_OPT),
        steps: int = typer.Option(
            1000, help="Optimizer steps in total (a resumed run continues to this).", rich_help_panel=_OPT
        ),
        lr: float = typer.Option(
            1.5e-3,
            help="Peak learning rate of AdamW (after warmup, then cosine decay).",
            rich_help_panel=_OPT,
        ),
        weight_decay: float = typer.Option(
            0.05, help="AdamW weight decay (not applied to norms/biases).", rich_help_panel=_OPT
        ),
        warmup_steps: int = typer.Option(
            -1, help="Linear warmup steps (-1: 5% of --steps).", rich_help_panel=_OPT
        ),
        grad_clip: float = typer.Option(1.0, help="Gradient norm clipping (0: off).", rich_help_panel=_OPT),
        seed: int = typer.Option(
            0, help="Random seed (data order, augmentations, masking, init).", rich_help_panel=_OPT
        ),
        mask_ratio: float = typer.Option(
            0.75, help="Fraction of patches hidden from the encoder.", rich_help_panel=_MAE
        ),
        decoder_dim: int = typer.Option(128, help="MAE decoder width.", rich_help_panel=_MAE),
        decoder_depth: int = typer.Option(2, help="MAE decoder blocks.", rich_help_panel=_MAE),
        norm_pix: bool = typer.Option(
            True,
            "--norm-pix/--no-norm-pix",
            help="Reconstruct per-patch normalised pixels.",
            rich_help_panel=_MAE,
        ),
        recon_every: int = typer.Option(
            0, help="Also save reconstruction figures every N steps (0: end only).", rich_help_panel=_MAE
        ),
        positives: str = typer.Option(
            "augment",
            help="Positive pairs: 'augment' (two views of one image), "
            "'patient' or 'study' (two different images of the same patient/study "
            "when available; all same-patient items in a batch are positives).",
            rich_help_panel=_CON,
        ),
        temperature: float = typer.Option(0.1, help="NT-Xent temperature.", rich_help_panel=_CON),
        proj_dim: int = typer.Option(128, help="Projection head output size.", rich_help_panel=_CON),
        flip: bool = typer.Option(
            False,
            "--flip/--no-flip",
            help="Random left-right flips (off by default: anatomy is lateralised).",
            rich_help_panel=_CON,
        ),
        precision: str = typer.Option(
            "32", help="32 | bf16-mixed | 16-mixed (bf16-mixed on recent GPUs).", rich_help_panel=_HW
        ),
        compile: bool = typer.Option(
            False,
            "--compile/--no-compile",
            help="torch.compile the training step (falls back to eager with a warning if it fails).",
            rich_help_panel=_HW,
        ),
        channels_last: bool = typer.Option(
            False,
            "--channels-last/--no-channels-last",
            help="Channels-last memory format for CNN encoders (faster convolutions in mixed precision).",
            rich_help_panel=_HW,
        ),
        accelerator: str = typer.Option("auto", help="auto | cpu | gpu.", rich_help_panel=_HW),
        devices: str = typer.Option(
            "auto", help="Number of devices (or 'auto', or a list like '0,1').", rich_help_panel=_HW
        ),
        num_nodes: int = typer.Option(1, help="Machines for multi-node training.", rich_help_panel=_HW),
        strategy: str = typer.Option("auto", help="auto | ddp | fsdp.", rich_help_panel=_HW),
        workers: int = typer.Option(
            0, help="DataLoader worker processes (0: load in the main process).", rich_help_panel=_HW
        ),
        threads: int = typer.Option(
            0, help="CPU threads for torch (0: torch's default).", rich_help_panel=_HW
        ),
        ckpt_every: int = typer.Option(
            100, help="Write checkpoints/last.ckpt every N steps (and at the end).", rich_help_panel=_HW
        ),
        log_every: int = typer.Option(
            10, help="Log loss / lr / throughput every N steps.", rich_help_panel=_HW
        ),
        resume: bool = typer.Option(
            True, "--resume/--no-resume", help="Continue from --out's checkpoint if there is one."
        ),
    ) -> None:
        from medfm.train.config import PretrainConfig
        from medfm.train.precision import describe_speed
        from medfm.train.trainer import run_pretrain

        try:
            enc_kw = json.loads(encoder_args) if encoder_args else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"--encoder-args is not valid JSON: {e}") from None
        if not isinstance(enc_kw, dict):
            raise ConfigError("--encoder-args must be a JSON object")
        cfg = PretrainConfig(
            objective=objective,
            data=[d.strip() for d in data.split(",") if d.strip()],
            split=None if split == "all" else split,
            out=out,
            encoder=encoder,
            spatial_dims=spatial_dims,
            img_size=img_size,
            patch_size=patch_size,
            encoder_kwargs=enc_kw,
            batch_size=batch_size,
            steps=steps,
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=None if warmup_steps < 0 else warmup_steps,
            grad_clip=grad_clip,
            seed=seed,
            mask_ratio=mask_ratio,
            decoder_dim=decoder_dim,
            decoder_depth=decoder_depth,
            norm_pix=norm_pix,
            recon_every=recon_every,
            positives=positives,
            temperature=temperature,
            proj_dim=proj_dim,
            flip=flip,
            precision=precision,
            compile=compile,
            channels_last=channels_last,
            accelerator=accelerator,
            devices=devices,
            num_nodes=num_nodes,
            strategy=strategy,
            workers=workers,
            threads=threads,
            ckpt_every=ckpt_every,
            log_every=log_every,
        )
        if cfg.threads > 0:
            import torch

            torch.set_num_threads(cfg.threads)
        run_dir = run_pretrain(cfg, resume=resume)
        from medfm.rundir import read_json

        m = run_dir / "metrics.json"
        if m.is_file():
            met = read_json(m)
            typer.echo(
                f"{run_dir}: {met['steps']} steps, final loss {met['final_loss']:.4f}, "
                f"{met['images_per_s']:.1f} images/s"
                + (f", {describe_speed(met)}" if describe_speed(met) else "")
            )

    command.__doc__ = doc
    return command


def register(app: typer.Typer) -> None:
    """Add the `pretrain` group with one command per registered objective."""
    from medfm.train import OBJECTIVES  # declared names + help: nothing imports Lightning here

    for name in OBJECTIVES.names():
        pretrain_app.command(name)(_make_command(name, OBJECTIVES.describe(name)))
    # Image-report pretraining lives with the vision-language commands; `pretrain clip` is the same command.
    from medfm.cli.vlm import clip

    pretrain_app.command("clip")(clip)
    app.add_typer(pretrain_app, name="pretrain")
