"""CLI: `medfm models ...` — list the encoder registry, inspect an encoder, import external weights."""

from __future__ import annotations

from pathlib import Path

import typer

models_app = typer.Typer(
    help="Encoders: list the registry, inspect one, import external weights.", no_args_is_help=True
)


def _default_encoder(name: str):  # noqa: ANN202 - returns medfm.models.Encoder (lazy import)
    """The encoder at its default size, built on the meta device so large models cost no memory or time."""
    import torch

    from medfm.models import create_encoder

    try:
        with torch.device("meta"):
            enc = create_encoder(name)
    except RuntimeError:  # some third-party modules (MONAI Swin) can't be built on meta
        enc = create_encoder(name)
    return enc


def _dims(name: str) -> str:
    """'2D/3D', or '2D' for encoders a library builds for images only (they refuse spatial_dims=3)."""
    import torch

    from medfm.errors import ConfigError
    from medfm.models import create_encoder

    try:
        with torch.device("meta"):
            create_encoder(name, spatial_dims=3)
    except ConfigError:
        return "2D"
    except RuntimeError:  # a third-party module that cannot be built on meta: it did accept 3D
        pass
    return "2D/3D"


@models_app.command("list")
def list_cmd(pattern: str = typer.Argument("*", help="Shell-style name filter, e.g. 'vit*'.")) -> None:
    """List registered encoders: name, family, dims, parameters at default size, description."""
    from rich.console import Console
    from rich.table import Table

    from medfm.models import list_encoders
    from medfm.models.registry import describe_encoder

    table = Table(title="medfm encoders")
    for col in ("name", "family", "dims", "params (default)", "description"):
        table.add_column(col)
    for name in list_encoders(pattern):
        enc = _default_encoder(name)
        n = sum(p.numel() for p in enc.parameters())
        table.add_row(name, enc.family, _dims(name), f"{n / 1e6:.1f}M", describe_encoder(name))
    Console().print(table)


@models_app.command("info")
def info_cmd(
    name: str = typer.Argument(..., help="Registered encoder name (see `medfm models list`)."),
    spatial_dims: int = typer.Option(2, "--spatial-dims", help="2 for images, 3 for volumes."),
    img_size: int = typer.Option(224, "--img-size", help="Input side length in pixels/voxels."),
    in_chans: int = typer.Option(1, "--in-chans", help="Input channels (1 for CT/MR/X-ray)."),
) -> None:
    """Print an encoder's embedding size, multi-scale feature shapes and parameter count for an input size."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from medfm.models import create_encoder

    enc = create_encoder(name, spatial_dims=spatial_dims, img_size=img_size, in_chans=in_chans).eval()
    x = torch.zeros(1, in_chans, *([img_size] * spatial_dims))
    with torch.no_grad():
        feats = enc.forward_features(x)
        pooled = enc(x)
    console = Console()
    n = sum(p.numel() for p in enc.parameters())
    console.print(
        f"[bold]{name}[/bold]  family={enc.family}  input={tuple(x.shape)}  "
        f"embed_dim={enc.embed_dim}  pooled={tuple(pooled.shape)}  params={n / 1e6:.2f}M"
    )
    table = Table(title="multi-scale features")
    for col in ("level", "channels", "stride", "shape"):
        table.add_column(col)
    for i, (f, c, s) in enumerate(zip(feats, enc.feature_dims, enc.feature_strides)):
        table.add_row(str(i), str(c), str(s), str(tuple(f.shape)))
    console.print(table)


def _parse_options(pairs: list[str]) -> dict[str, object]:
    """KEY=VALUE pairs -> converter options (JSON values where they parse: numbers, true/false, lists)."""
    import json

    from medfm.errors import ConfigError

    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option expects KEY=VALUE, got {pair!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


@models_app.command("import")
def import_cmd(
    source: Path = typer.Argument(
        ...,
        help="External weights (local file or folder): open_clip folder or OpenAI-CLIP state dict, Hugging "
        "Face folder (ViT/DINOv2/RAD-DINO, Swin, ConvNeXt, ResNet, CLIP, SigLIP), SAM / MedSAM, SAM 2 / "
        "MedSAM2, torchxrayvision, RadImageNet ResNet-50, MONAI bundle, timm ViT/ConvNeXt.",
    ),
    out: Path = typer.Argument(..., help="Output run directory."),
    format: str = typer.Option("auto", "--format", "-f",
                               help="Source format (see `medfm models formats`); auto-detected by default."),
    arch: str = typer.Option(
        None, "--arch", help="Architecture hint when shapes are ambiguous, e.g. vit_small_patch16_224."
    ),
    in_chans: int = typer.Option(
        None, "--in-chans", help="Input channels medfm feeds (1: grey, repeated or summed to RGB)."
    ),
    img_size: int = typer.Option(
        None, "--img-size", help="Input size (position embeddings are resized to fit)."
    ),
    option: list[str] = typer.Option(
        [], "--option", "-o", help="Format-specific KEY=VALUE, e.g. tokenizer=DIR, vision_only=true, "
        "labels='[\"a\",\"b\"]', as_encoder=true. Repeatable."
    ),
) -> None:
    """Convert a public model's local checkpoint into a medfm run directory (safetensors + config + card).

    The run works with every medfm command of its kind: an encoder with adapt / audit / export / serve, a
    CLIP run with zeroshot / retrieve / report, a classifier with predict / audit, a promptable or
    segmenter run with segment. Files that need unpickling arbitrary objects are refused.
    """
    from medfm.models.formats import get_format, import_model

    opts = {"arch": arch, "in_chans": in_chans, "img_size": img_size, **_parse_options(option)}
    run, used = import_model(source, out, format=format, **opts)
    typer.echo(f"wrote {run} (format {used}, kind {get_format(used).kind})")


@models_app.command("formats")
def formats_cmd() -> None:
    """List the checkpoint formats `medfm models import` reads, in auto-detection order."""
    from rich.console import Console
    from rich.table import Table

    from medfm.models.formats import format_names, get_format

    table = Table(title="import formats (auto-detection order)")
    for col in ("format", "run kind", "what"):
        table.add_column(col)
    for name in format_names():
        try:
            fmt = get_format(name)
        except ModuleNotFoundError:
            continue
        table.add_row(name, fmt.kind, fmt.help)
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add the `models` group to the main app."""
    app.add_typer(models_app, name="models")
