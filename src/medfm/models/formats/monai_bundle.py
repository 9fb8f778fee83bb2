"""MONAI bundles (``configs/metadata.json`` + ``configs/inference.json|yaml`` + ``models/model.pt``).

The bundle's ``network_def`` (``{"_target_": "SwinUNETR", ...args}``) names a class of
``monai.networks.nets``; medfm builds that class itself with the literal args, loads the bundle's plain
state dict into it and writes a "segmenter" run (``decoder: "monai_network"``) whose config stores the
class name and args, so the run rebuilds without the bundle. ``as_encoder=True`` (SwinUNETR only) writes
the ``swinViT.*`` part as medfm's ``swin_tiny`` encoder instead.

The bundle's config is read as data, never run: MONAI's ``ConfigParser`` would evaluate its ``$...``
expressions (Python code from the file). Simple ``@name`` references to literal values of the same config
are resolved; an arg that is an expression is refused with its name unless given with ``net_args``.
TorchScript files (``models/model.ts``) and pickled whole modules are refused with a re-save recipe.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medfm.errors import ConfigError, InputError
from medfm.models.formats import register_format, source_record

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
WEIGHT_NAMES = ("model.safetensors", "model.pt", "model.pth")
DECODER = "monai_network"
# Bundle keys that are not constructor args (MONAI's own config syntax).
_SPECIAL = ("_target_", "_desc_", "_requires_", "_disabled_", "_mode_")
# Constructor args that newer MONAI dropped (SwinUNETR's img_size, deprecated in 1.3): kept as the
# inference window instead of failing on them.
_DROPPED = {"SwinUNETR": ("img_size",)}
_ROI_DEFAULT = 96
_TS_RECIPE = (
    "TorchScript is not read (it is code); re-save its weights as a plain state dict where you trust it: "
    "python -c \"import torch; torch.save(torch.jit.load('models/model.ts').state_dict(), "
    "'models/model.pt')\" (or use the bundle's own models/model.pt)"
)
_PICKLE_RECIPE = (
    "; if it is a whole pickled network and you trust the file, re-save its state dict in MONAI: "
    "python -c \"import torch; torch.save(torch.load('models/model.pt', weights_only=False).state_dict(), "
    "'models/model_sd.pt')\" and pass weights=models/model_sd.pt"
)


# -- reading the bundle (as data) ---------------------------------------------------------------------


def bundle_root(path: Path) -> Path | None:
    """The bundle folder of ``path`` (the folder itself, or a file in its configs/ or models/), else None."""
    p = Path(path)
    cands = [p] if p.is_dir() else [p.parent.parent] if p.parent.name in ("configs", "models") else []
    for root in cands:
        if (root / "configs" / "metadata.json").is_file() and _config_file(root) is not None:
            return root
    return None


def _config_file(root: Path, name: str | None = None) -> Path | None:
    names = (name,) if name else CONFIG_NAMES
    for n in names:
        p = root / "configs" / n if not Path(n).is_absolute() else Path(n)
        if p.is_file():
            return p
    return None


def detect(path: Path) -> bool:
    """A folder with configs/metadata.json and configs/inference.json|yaml (or a file inside one)."""
    try:
        return bundle_root(Path(path)) is not None
    except OSError:
        return False


def read_config(path: Path) -> dict[str, Any]:
    """A bundle config file (JSON or YAML, safe loaders only) as a dict; InputError if unreadable."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read ({type(e).__name__})") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            obj = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InputError(path, f"not valid YAML ({str(e).splitlines()[0]})") from None
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(path, f"not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise InputError(path, "bundle config is not a mapping")
    return obj


class _NotLiteral(Exception):
    """A value that is an expression, a macro or an object to construct (not plain data)."""


def _lookup(config: dict[str, Any], ref: str) -> Any:
    """The value at ``@a#b#c`` (MONAI's id separator '#', older '::'); KeyError when absent."""
    node: Any = config
    for part in ref.replace("::", "#").split("#"):
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node[part]
        else:
            raise KeyError(ref)
    return node


def literal(value: Any, config: dict[str, Any], depth: int = 0) -> Any:
    """``value`` with ``@name`` references to plain values of ``config`` replaced; _NotLiteral otherwise."""
    if depth > 8:
        raise _NotLiteral("references nest too deeply")
    if isinstance(value, str):
        if value.startswith("$"):
            raise _NotLiteral(f"is an expression ({value[:60]})")
        if value.startswith("%"):
            raise _NotLiteral(f"is a macro from another file ({value[:60]})")
        if value.startswith("@"):
            try:
                target = _lookup(config, value[1:])
            except (KeyError, IndexError, ValueError):
                raise _NotLiteral(f"refers to {value}, which the config does not define") from None
            return literal(target, config, depth + 1)
        return value
    if isinstance(value, list):
        return [literal(v, config, depth) for v in value]
    if isinstance(value, dict):
        if "_target_" in value:
            raise _NotLiteral(f"constructs an object ({value['_target_']})")
        return {str(k): literal(v, config, depth) for k, v in value.items()}
    return value


def _parse_net_args(net_args: dict[str, Any] | list[str] | tuple[str, ...] | None) -> dict[str, Any]:
    """Overrides as a dict; CLI strings ``key=value`` with the value read as JSON when it parses."""
    if not net_args:
        return {}
    items = net_args.items() if isinstance(net_args, dict) else []
    if not isinstance(net_args, dict):
        pairs = []
        for s in net_args:
            if "=" not in str(s):
                raise ConfigError(f"net_args entry {s!r} is not key=value")
            k, v = str(s).split("=", 1)
            pairs.append((k.strip(), v))
        items = pairs
    out = {}
    for k, v in items:
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass  # a bare string such as instance or merging
        out[str(k)] = v
    return out


def network_class(target: str) -> type[nn.Module]:
    """The ``monai.networks.nets`` class a ``_target_`` names ('SwinUNETR', 'monai.networks.nets.X')."""
    import monai.networks.nets as nets

    name = target.rsplit(".", 1)[-1]
    module = target.rsplit(".", 1)[0] if "." in target else ""
    cls = getattr(nets, name, None)
    if (module and not module.startswith("monai.networks.nets")) or not (
        isinstance(cls, type) and issubclass(cls, nn.Module)
    ):
        raise ConfigError(f"network '{target}' is not a class of monai.networks.nets")
    return cls


def network_args(
    config: dict[str, Any], path: Path, net_args: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(class name, literal constructor args, dropped args) of the bundle's ``network_def``."""
    net = config.get("network_def")
    if net is None and isinstance(config.get("network"), dict):
        net = config["network"]
    if isinstance(net, str) and net.startswith("@"):
        try:
            net = _lookup(config, net[1:])
        except (KeyError, IndexError, ValueError):
            net = None
    if not isinstance(net, dict) or not isinstance(net.get("_target_"), str):
        raise InputError(path, "no network_def with a _target_ in this bundle config")
    cls = network_class(net["_target_"])
    name = cls.__name__
    overrides = _parse_net_args(net_args)
    raw = {k: v for k, v in net.items() if k not in _SPECIAL}
    raw.update(overrides)
    args: dict[str, Any] = {}
    for k, v in raw.items():
        if k in overrides:
            args[k] = v
            continue
        try:
            args[k] = literal(v, config)
        except _NotLiteral as e:
            raise InputError(
                path, f"network_def arg '{k}' {e}; medfm does not run bundle code, pass it as net_args "
                f"(--net-arg {k}=VALUE)"
            ) from None
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    dropped = {k: args.pop(k) for k in list(args) if k in _DROPPED.get(name, ()) and k not in params}
    unknown = [k for k in args if k not in params and not takes_any]
    if unknown:
        import monai

        raise InputError(
            path, f"{name} of MONAI {monai.__version__} takes no arg(s) {', '.join(unknown)}; "
            "override or drop them with net_args"
        )
    return name, args, dropped


def _tuples(v: Any) -> Any:
    """JSON lists back to the tuples MONAI's signatures expect (nested; dicts kept)."""
    if isinstance(v, list):
        return tuple(_tuples(x) for x in v)
    if isinstance(v, dict):
        return {k: _tuples(x) for k, x in v.items()}
    return v


def build_network(name: str, args: dict[str, Any]) -> nn.Module:
    """``monai.networks.nets.<name>(**args)``: the library builds the network."""
    return network_class(name)(**{k: _tuples(v) for k, v in args.items()})


def _arg(cls_name: str, args: dict[str, Any], key: str, fallback: Any = None) -> Any:
    """A constructor arg as given, else the class's default."""
    if key in args:
        return args[key]
    p = inspect.signature(network_class(cls_name).__init__).parameters.get(key)
    return fallback if p is None or p.default is inspect.Parameter.empty else p.default


class MonaiSegmenter(nn.Module):
    """A MONAI network on medfm inputs: images in [0, 1] are mapped to the bundle's intensity range
    (``input_range``: ScaleIntensityRanged's b_min..b_max) before the network; returns the logits."""

    decoder_name = DECODER

    def __init__(self, network: str, args: dict[str, Any], input_range: tuple[float, float] = (0.0, 1.0)):
        super().__init__()
        self.net = build_network(network, args)
        self.network, self.input_range = network, (float(input_range[0]), float(input_range[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.input_range
        if (lo, hi) != (0.0, 1.0):
            x = x * (hi - lo) + lo
        out = self.net(x)
        # Deep-supervision networks return a list in training; the first entry is the full-size output.
        return out[0] if isinstance(out, (list, tuple)) else out


def build_segmenter(spec: dict[str, Any]) -> MonaiSegmenter:
    """The model a run's config ``network`` block ({"class", "args", "input_range"}) describes."""
    return MonaiSegmenter(spec["class"], spec.get("args") or {}, tuple(spec.get("input_range") or (0.0, 1.0)))


# -- preprocessing, labels, outputs -------------------------------------------------------------------


def _transforms(config: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The transform dicts of a Compose at ``config[key]`` (following one @reference), [] when none."""
    node = config.get(key)
    if isinstance(node, str) and node.startswith("@"):
        try:
            node = _lookup(config, node[1:])
        except (KeyError, IndexError, ValueError):
            return []
    if isinstance(node, dict):
        node = node.get("transforms")
    if isinstance(node, str) and node.startswith("@"):
        try:
            node = _lookup(config, node[1:])
        except (KeyError, IndexError, ValueError):
            return []
    return [t for t in node if isinstance(t, dict) and isinstance(t.get("_target_"), str)] if isinstance(
        node, list
    ) else []


def transform_hints(config: dict[str, Any], key: str = "preprocessing") -> list[dict[str, Any]]:
    """Each transform as {"transform": name, literal args...}; a non-literal arg reads "<expression>"."""
    out = []
    for t in _transforms(config, key):
        rec: dict[str, Any] = {"transform": t["_target_"].rsplit(".", 1)[-1]}
        for k, v in t.items():
            if k in _SPECIAL or k in ("keys", "allow_missing_keys"):
                continue
            try:
                rec[k] = literal(v, config)
            except _NotLiteral:
                rec[k] = "<expression>"
        out.append(rec)
    return out


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def medfm_preprocessing(
    hints: list[dict[str, Any]], spatial_dims: int, in_chans: int, roi: list[int]
) -> tuple[dict[str, Any], tuple[float, float], list[str], list[str]]:
    """(medfm spec, input_range, what medfm replays, what the user must replay) from the bundle's
    preprocessing transforms."""
    from medfm.data.preprocess import make_spec

    values: dict[str, Any] = {"channels": int(in_chans)}
    if spatial_dims == 2 and roi and len(set(roi)) == 1:
        values["size"] = int(roi[0])
    input_range = (0.0, 1.0)
    replayed, manual = [], []
    for h in hints:
        name = h["transform"]
        if name in ("LoadImaged", "LoadImage", "EnsureChannelFirstd", "EnsureTyped", "EnsureType",
                    "ToTensord", "AddChanneld", "EnsureChannelFirst"):
            continue  # reading and typing: medfm's readers do this
        if name.startswith("ScaleIntensityRange") and not name.startswith("ScaleIntensityRangePercentiles"):
            a, b = _num(h.get("a_min")), _num(h.get("a_max"))
            lo, hi = _num(h.get("b_min", 0.0)), _num(h.get("b_max", 1.0))
            if None not in (a, b, lo, hi) and b > a:  # type: ignore[operator]
                values.update(window=[a, b], normalisation="window", modality="ct")
                input_range = (lo, hi)  # type: ignore[assignment]
                replayed.append(f"{name} {a:g}..{b:g} -> {lo:g}..{hi:g} (window, then scaled in the model)")
                if h.get("clip") is not True:
                    manual.append(f"{name} has clip={h.get('clip', False)}: medfm clips to the window")
                continue
        if name.startswith("Spacing") and isinstance(h.get("pixdim"), list):
            pix = [_num(v) for v in h["pixdim"]]
            if len(pix) == spatial_dims and None not in pix and spatial_dims == 3:
                values["spacing"] = pix
                # prepare resamples to the spec's spacing; segment predict keeps a raw volume's own grid
                replayed.append(f"{name} pixdim {pix} (by `medfm data prepare` with this spec)")
                manual.append(f"raw volumes given to `segment predict` keep their grid: resample to {pix} mm")
                continue
        if name.startswith("ScaleIntensity") and name.rstrip("d") == "ScaleIntensity":
            if _num(h.get("minv", 0.0)) == 0.0 and _num(h.get("maxv", 1.0)) == 1.0:
                values["normalisation"] = "minmax"
                replayed.append(f"{name} (min-max to 0..1)")
                continue
        args = ", ".join(f"{k}={v}" for k, v in h.items() if k != "transform")
        manual.append(f"{name}({args})")
    return make_spec(**values), input_range, replayed, manual


def label_names(metadata: dict[str, Any]) -> dict[str, str]:
    """``{channel: name}`` of the first output in metadata.json's network_data_format that has channel_def."""
    outputs = (metadata.get("network_data_format") or {}).get("outputs") or {}
    for out in outputs.values() if isinstance(outputs, dict) else []:
        cdef = out.get("channel_def") if isinstance(out, dict) else None
        if isinstance(cdef, dict) and cdef:
            return {str(k): str(v) for k, v in cdef.items()}
    return {}


def output_activation(config: dict[str, Any]) -> str | None:
    """'sigmoid' / 'softmax' / 'argmax' as the bundle's postprocessing states it, None when it does not."""
    for t in transform_hints(config, "postprocessing"):
        if t["transform"].startswith("Activations"):
            if t.get("sigmoid") is True:
                return "sigmoid"
            if t.get("softmax") is True:
                return "softmax"
        if t["transform"].startswith("AsDiscrete") and t.get("argmax") is True:
            return "argmax"
    return None


def inference_roi(config: dict[str, Any], dropped: dict[str, Any], spatial_dims: int) -> list[int] | None:
    """The sliding-window size: the inferer's literal roi_size, else SwinUNETR's old img_size."""
    inf = config.get("inferer")
    cands = [inf.get("roi_size") if isinstance(inf, dict) else None, dropped.get("img_size")]
    for c in cands:
        try:
            v = literal(c, config)
        except _NotLiteral:
            continue
        if isinstance(v, int):
            v = [v] * spatial_dims
        if isinstance(v, list) and len(v) == spatial_dims and all(isinstance(s, int) for s in v):
            return [int(s) for s in v]
    return None


# -- weights ------------------------------------------------------------------------------------------


def weights_file(root: Path, weights: str | None = None) -> Path:
    """The bundle's weights file: ``weights`` if given, else models/model.safetensors, model.pt, model.pth.

    TorchScript alone is refused with a re-save recipe."""
    if weights:
        p = Path(weights)
        p = p if p.is_absolute() or p.exists() else root / p
        if not p.is_file():
            raise InputError(p, "no such weights file")
    else:
        p = next((root / "models" / n for n in WEIGHT_NAMES if (root / "models" / n).is_file()), None)
        if p is None:
            ts = root / "models" / "model.ts"
            if ts.is_file():
                raise InputError(ts, _TS_RECIPE)
            raise InputError(root / "models", f"no weights ({', '.join(WEIGHT_NAMES)}) in the bundle")
    if p.suffix == ".ts":
        raise InputError(p, _TS_RECIPE)
    return p


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The plain state dict in a bundle weights file (unwrapping {"model"|"state_dict"|"network": sd})."""
    from medfm.models.checkpoint import REFUSED, read_safetensors, read_torch_weights, state_dict_from

    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    try:
        obj = read_torch_weights(path)
    except InputError as e:
        if e.problem == REFUSED:
            raise InputError(path, REFUSED + _PICKLE_RECIPE) from None
        raise
    if isinstance(obj, dict) and isinstance(obj.get("network"), dict):
        obj = obj["network"]  # MONAI CheckpointSaver with save_dict={"network": ...}
    return state_dict_from(obj, path)


def _load_strict(net: nn.Module, sd: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Load every key or fail naming the ones that do not fit."""
    target = net.state_dict()
    missing = sorted(set(target) - set(sd))
    unexpected = sorted(set(sd) - set(target))
    wrong = sorted(k for k in set(sd) & set(target) if tuple(sd[k].shape) != tuple(target[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{n} {label}: {', '.join(ks[:4])}" for n, label, ks in
                 ((len(missing), "missing", missing), (len(unexpected), "unexpected", unexpected),
                  (len(wrong), "of another shape", wrong)) if ks]
        raise InputError(path, f"weights do not fit {what} ({'; '.join(parts)})")
    net.load_state_dict(sd, strict=True)


# -- the encoder alone (SwinUNETR -> swin_tiny) ---------------------------------------------------------


def swin_encoder(args: dict[str, Any], sd: dict[str, torch.Tensor], roi: list[int], path: Path) -> Any:
    """medfm's ``swin_tiny`` encoder holding SwinUNETR's ``swinViT.*`` weights (its pooled-output LayerNorm,
    which SwinUNETR does not have, stays at identity)."""
    from medfm.models.registry import create_encoder

    def a(k: str) -> Any:
        return _arg("SwinUNETR", args, k)

    fixed = {"patch_size": 2, "qkv_bias": True, "patch_norm": False, "downsample": "merging", "use_v2": False,
             "use_hyena": False}
    off = [f"{k}={a(k)}" for k, want in fixed.items() if k in args and args[k] != want]
    ws = a("window_size")
    ws_list = list(ws) if isinstance(ws, (list, tuple)) else [ws]
    if len(set(ws_list)) != 1:
        off.append(f"window_size={ws}")
    if off:
        raise InputError(path, f"the swin_tiny encoder cannot hold a SwinUNETR with {', '.join(off)}")
    enc = create_encoder(
        "swin_tiny",
        spatial_dims=int(a("spatial_dims")),
        in_chans=int(a("in_channels")),
        img_size=list(roi),
        embed_dim=int(a("feature_size")),
        depths=list(a("depths")),
        num_heads=list(a("num_heads")),
        window_size=int(ws_list[0]),
        mlp_ratio=float(a("mlp_ratio")),
        drop_path_rate=float(a("dropout_path_rate")),
    )
    sub = {f"swin.{k[len('swinViT.'):]}": v for k, v in sd.items() if k.startswith("swinViT.")}
    if not sub:
        raise InputError(path, "no swinViT.* weights (not a SwinUNETR state dict)")
    sub.update({k: v for k, v in enc.state_dict().items() if k.startswith("norm.")})
    _load_strict(enc, sub, path, "the swin_tiny encoder")
    return enc.eval()


# -- the converter ------------------------------------------------------------------------------------


def card_section(conf: dict[str, Any]) -> str:
    """Markdown of what was imported and what inference must replay by hand."""
    b, net = conf["bundle"], conf["network"]
    lo, hi = net["input_range"]
    args = ", ".join(f"{k}={v}" for k, v in net["args"].items())
    classes = ", ".join(conf["class_names"]) or "?"
    replayed = "".join(f"- {r}\n" for r in b["replayed"]) or "- nothing (no literal intensity transform)\n"
    manual = "".join(f"- {m}\n" for m in b["manual"]) or "- nothing else stated by the bundle\n"
    act = b.get("activation")
    act_text = (
        "\n**Output**: the bundle applies a *sigmoid* per channel (overlapping labels); medfm takes the "
        "argmax over channels, which is not the bundle's labelling: threshold the logits yourself.\n"
        if act == "sigmoid" else ""
    )
    roi_note = "" if b.get("roi_stated") else " (not stated by the bundle: medfm's default)"
    return f"""## Imported MONAI bundle
Bundle `{b.get('name')}` version {b.get('version')} (MONAI {b.get('monai_version')}). Network
`monai.networks.nets.{net['class']}` ({args}), built by MONAI from these args; its weights are the
bundle's. Classes (besides background): {classes}.
Sliding-window size {conf['patch']}{roi_note}.
{act_text}
## Preprocessing
Replayed by medfm (the spec above; images reach the network in {lo:g}..{hi:g}):
{replayed}
You must replay yourself (medfm does not run them; give inputs already prepared so):
{manual}
Commands: `medfm segment predict RUN DATA -o masks/`, `medfm segment evaluate RUN DATA -o EVAL`.
"""


def _write_card(run_path: Path, conf: dict[str, Any]) -> None:
    """README.md: the common header, the bundle section, how to load, limitations."""
    from medfm.modelcard.common import LIMITATIONS, header, how_to_load
    from medfm.rundir import RunDir

    run = RunDir(run_path, kind="segmenter")
    full = run.config()
    text = "\n".join(p.rstrip() + "\n" for p in (
        header("segmenter", full, run.path), card_section(conf), how_to_load("segmenter", run.path),
        LIMITATIONS,
    ))
    run.write_text("README.md", text)


@register_format(
    "monai_bundle", detect,
    "MONAI bundle folder (configs/metadata.json + inference.json|yaml + models/model.pt|safetensors): "
    "a 3D segmenter run, or with as_encoder=True SwinUNETR's swin encoder", kind="segmenter",
)
def convert(
    src: Path,
    out: Path,
    net_args: dict[str, Any] | list[str] | None = None,
    as_encoder: bool = False,
    weights: str | None = None,
    config: str | None = None,
    roi_size: int | list[int] | None = None,
) -> Path:
    """Write the bundle as a "segmenter" run (or, ``as_encoder``, SwinUNETR's encoder as an "encoder" run).

    ``net_args`` overrides / supplies network_def args (e.g. ones the bundle computes with ``$...``),
    ``weights`` names another weights file, ``config`` another config in configs/, ``roi_size`` the
    sliding window when the bundle does not state one."""
    from medfm.tasks.segment.runs import save_run

    root = bundle_root(Path(src))
    if root is None:
        raise InputError(src, "not a MONAI bundle (needs configs/metadata.json and configs/inference.json)")
    cfg_path = _config_file(root, config)
    if cfg_path is None:
        raise InputError(root / "configs", f"no bundle config {config or ' / '.join(CONFIG_NAMES)}")
    cfg = read_config(cfg_path)
    metadata = read_config(root / "configs" / "metadata.json")
    name, args, dropped = network_args(cfg, cfg_path, net_args)
    spatial_dims = int(_arg(name, args, "spatial_dims", 3))
    in_chans = int(_arg(name, args, "in_channels", 1))
    num_classes = int(_arg(name, args, "out_channels", 2))
    roi = inference_roi(cfg, dropped, spatial_dims)
    roi_stated = roi is not None
    if roi_size is not None:
        roi, roi_stated = ([int(roi_size)] * spatial_dims if isinstance(roi_size, int)
                           else [int(s) for s in roi_size]), True
    roi = roi or [_ROI_DEFAULT] * spatial_dims

    if weights is None and Path(src).is_file() and Path(src).parent.name == "models":
        weights = str(Path(src).resolve())  # the weights file the user named
    wpath = weights_file(root, weights)
    sd = read_state_dict(wpath)
    meta = {k: metadata.get(k) for k in ("name", "version", "monai_version") if metadata.get(k) is not None}
    record = source_record(wpath, "monai_bundle", bundle=meta.get("name", root.name),
                           version=meta.get("version"), network=name)
    if as_encoder:
        if name != "SwinUNETR":
            raise ConfigError(f"as_encoder needs a SwinUNETR bundle; this one is {name}")
        from medfm.models.formats.runs import write_encoder_run

        enc = swin_encoder(args, sd, roi, wpath)
        n_swin = sum(k.startswith("swinViT.") for k in sd)
        return write_encoder_run(enc, out, record, {"tensors_imported": n_swin, "tensors_in_bundle": len(sd)})

    try:
        model = MonaiSegmenter(name, args)
    except (TypeError, ValueError, AssertionError) as e:
        why = f"{type(e).__name__}: {str(e)[:120]}"
        raise InputError(cfg_path, f"{name}({args}) cannot be built ({why})") from None
    _load_strict(model.net, sd, wpath, name)

    hints = transform_hints(cfg)
    spec, input_range, replayed, manual = medfm_preprocessing(hints, spatial_dims, in_chans, roi)
    model.input_range = input_range
    labels = label_names(metadata)
    activation = output_activation(cfg)
    names = [labels.get(str(k), f"class_{k}") for k in range(1, num_classes)]
    if activation == "sigmoid":
        manual.append("outputs are per-channel sigmoids (overlapping labels), not one label map")
    conf = {
        "decoder": DECODER,
        "network": {"class": name, "args": args, "input_range": list(input_range)},
        "num_classes": num_classes,
        "spatial_dims": spatial_dims,
        "in_chans": in_chans,
        "patch": roi,
        "img_size": roi[0] if spatial_dims == 2 and len(set(roi)) == 1 else None,
        "feature_size": None,
        "encoder": None,
        "class_names": names,
        "preprocessing": spec,
        "bundle": {**meta, "labels": labels, "activation": activation, "preprocessing": hints,
                   "replayed": replayed, "manual": manual, "roi_stated": roi_stated,
                   "dropped_args": dropped},
        "imported": record,
    }
    save_run(model, "segmenter", conf, out)
    _write_card(Path(out), conf)
    return Path(out)
