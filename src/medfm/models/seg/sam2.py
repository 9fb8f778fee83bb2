"""SAM 2 / SAM 2.1 / MedSAM2 as a medfm promptable model: the single-image, memory-free path.

SAM 2 (Ravi et al. 2024) on one image: a Hiera trunk + FPN neck give three feature levels (strides 4, 8, 16);
the stride-16 level plus the learned ``no_mem_embed`` token (``directly_add_no_mem_embed``: what SAM 2 does
for a frame with no memory) is the image embedding, and the two high-resolution levels, projected by the
mask decoder's ``conv_s0`` / ``conv_s1``, refine the decoder's upscaling. The memory attention / memory
encoder / object-pointer modules only matter for video and are not built.

The network is the ``sam2`` package's own modules, used as a library (exact parity with its image
predictor); that package is imported only when a SAM 2 model is built. Module names follow the official key
layout, so an official state dict loads without renaming.

``embed_image`` returns ONE tensor, like :class:`medfm.models.seg.sam.PromptableSegmenter`, so medfm's prompt
code (``.expand`` per object, batching) works unchanged: the high-resolution levels are folded into extra
channels of the stride-16 grid with ``pixel_unshuffle`` (a lossless rearrangement) and unfolded in ``decode``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfm.errors import ConfigError

SAM2_PIXEL_MEAN = (0.485, 0.456, 0.406)  # ImageNet, what SAM2Transforms normalises with
SAM2_PIXEL_STD = (0.229, 0.224, 0.225)

# The official Hiera sizes (configs sam2.1_hiera_{t,s,b+,l}.yaml; SAM 2.0 uses the same), keyed by name.
# Heads, global-attention blocks and window sizes are not visible in tensor shapes: they come from here.
OFFICIAL_TRUNKS: dict[str, dict[str, Any]] = {
    "tiny": {"embed_dim": 96, "num_heads": 1, "stages": [1, 2, 7, 2], "global_att_blocks": [5, 7, 9],
             "window_spec": [8, 4, 14, 7], "window_pos_embed_bkg_spatial_size": [7, 7]},
    "small": {"embed_dim": 96, "num_heads": 1, "stages": [1, 2, 11, 2], "global_att_blocks": [7, 10, 13],
              "window_spec": [8, 4, 14, 7], "window_pos_embed_bkg_spatial_size": [7, 7]},
    "base_plus": {"embed_dim": 112, "num_heads": 2, "stages": [2, 3, 16, 3],
                  "global_att_blocks": [12, 16, 20], "window_spec": [8, 4, 14, 7],
                  "window_pos_embed_bkg_spatial_size": [14, 14]},
    "large": {"embed_dim": 144, "num_heads": 2, "stages": [2, 6, 36, 4], "global_att_blocks": [23, 33, 43],
              "window_spec": [8, 4, 16, 8], "window_pos_embed_bkg_spatial_size": [7, 7]},
}


def default_config() -> dict[str, Any]:
    """The medfm config of SAM 2.1 Hiera-T at 1024 px (the other sizes differ in ``trunk`` only)."""
    return {
        "arch": "sam2",
        "img_size": 1024,
        "trunk": {**copy.deepcopy(OFFICIAL_TRUNKS["tiny"]), "q_pool": 3, "q_stride": [2, 2], "dim_mul": 2.0,
                  "head_mul": 2.0},
        "neck": {"d_model": 256, "backbone_channel_list": [768, 384, 192, 96], "fpn_top_down_levels": [2, 3],
                 "fpn_interp_model": "nearest", "fuse_type": "sum", "kernel_size": 1, "scalp": 1},
        "prompt": {"mask_in_chans": 16},
        "decoder": {"depth": 2, "num_heads": 8, "mlp_dim": 2048, "num_multimask_outputs": 3,
                    "iou_head_depth": 3, "iou_head_hidden_dim": 256, "use_high_res_features": True,
                    "iou_prediction_use_sigmoid": True, "pred_obj_scores": True, "pred_obj_scores_mlp": True,
                    "use_multimask_token_for_obj_ptr": True,
                    # build_sam2's default post-processing for image models (apply_postprocessing=True)
                    "dynamic_multimask_via_stability": True, "dynamic_multimask_stability_delta": 0.05,
                    "dynamic_multimask_stability_thresh": 0.98},
        "directly_add_no_mem_embed": True,
        "pixel_mean": list(SAM2_PIXEL_MEAN),
        "pixel_std": list(SAM2_PIXEL_STD),
    }


def _sam2_modules() -> dict[str, Any]:
    """The sam2 package's module classes (imported lazily: medfm works without sam2 for everything else)."""
    try:
        from sam2.modeling.backbones.hieradet import Hiera
        from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
        from sam2.modeling.position_encoding import PositionEmbeddingSine
        from sam2.modeling.sam.mask_decoder import MaskDecoder
        from sam2.modeling.sam.prompt_encoder import PromptEncoder
        from sam2.modeling.sam.transformer import TwoWayTransformer
    except ImportError as e:
        raise ConfigError(f"SAM 2 models: this needs the sam2 package (pip install sam2; {e})") from None
    return {"Hiera": Hiera, "FpnNeck": FpnNeck, "ImageEncoder": ImageEncoder,
            "PositionEmbeddingSine": PositionEmbeddingSine, "MaskDecoder": MaskDecoder,
            "PromptEncoder": PromptEncoder, "TwoWayTransformer": TwoWayTransformer}


def level_strides(trunk: dict[str, Any], scalp: int) -> list[int]:
    """Strides of the neck's output levels after the scalp (patch embedding 4, then x2 per pooled stage)."""
    n = len(trunk["stages"])
    q = int(trunk.get("q_pool", 3))
    strides = [4 * int(trunk.get("q_stride", [2, 2])[0]) ** min(i, q) for i in range(n)]
    return strides[: n - scalp] if scalp else strides


def check_trunk(tr: dict[str, Any]) -> None:
    """ConfigError for a Hiera layout the library would crash on (a ZeroDivisionError deep in a forward)."""
    stages = [int(n) for n in tr["stages"]]
    if len(tr["window_spec"]) != len(stages):
        raise ConfigError(f"SAM 2 trunk: window_spec {tr['window_spec']} needs one size per stage {stages}")
    starts = [sum(stages[:i]) for i in range(1, len(stages))][: int(tr.get("q_pool", 3))]
    q = int(tr.get("q_stride", [2, 2])[0])
    for i, b in enumerate(starts):
        # a pooling block keeps the previous stage's window, shrunk by the stride: it must stay >= 1
        if b in tr["global_att_blocks"] or int(tr["window_spec"][i]) // q < 1:
            raise ConfigError(
                f"SAM 2 trunk: block {b} pools (first of stage {i + 2}) so it cannot use global attention or "
                f"a window under {q} (global_att_blocks {tr['global_att_blocks']}, window_spec "
                f"{tr['window_spec']})"
            )


class Sam2Promptable(nn.Module):
    """SAM 2's single-image path with the API of ``PromptableSegmenter``: ``embed_image`` / ``decode``.

    Images (B, C, H, W) in [0, 1] at ``img_size`` (grey is repeated to RGB, ImageNet mean / std applied
    inside); boxes (B, 4) x0 y0 x1 y1 and points ((B, N, 2) x, y; (B, N) labels 1 / 0 / -1 pad) in pixels of
    that image; masks (B, 1, img_size/4, img_size/4) low-res logits."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        m = _sam2_modules()
        cfg = copy.deepcopy(config)
        self.config: dict[str, Any] = cfg
        self.img_size = int(cfg["img_size"])
        tr, nk, dc = cfg["trunk"], cfg["neck"], cfg["decoder"]
        check_trunk(tr)
        strides = level_strides(tr, int(nk.get("scalp", 1)))
        deepest = 4 * int(tr.get("q_stride", [2, 2])[0]) ** int(tr.get("q_pool", 3))
        if self.img_size % deepest:
            raise ConfigError(
                f"SAM 2 img_size {self.img_size} must be divisible by the trunk's deepest stride {deepest}"
            )
        self.use_high_res = bool(dc["use_high_res_features"])
        self.num_levels = 3 if self.use_high_res else 1
        s = strides[-1]
        if self.use_high_res and strides[-3:] != [s // 4, s // 2, s]:
            raise ConfigError(f"SAM 2 high-resolution features need levels at strides s/4, s/2, s; got "
                              f"{strides}")
        self.stride = strides[-1]
        grid = self.img_size // self.stride
        d = int(nk["d_model"])
        trunk = m["Hiera"](
            embed_dim=int(tr["embed_dim"]), num_heads=int(tr["num_heads"]), q_pool=int(tr.get("q_pool", 3)),
            q_stride=tuple(tr.get("q_stride", (2, 2))), stages=tuple(tr["stages"]),
            dim_mul=float(tr.get("dim_mul", 2.0)), head_mul=float(tr.get("head_mul", 2.0)),
            window_pos_embed_bkg_spatial_size=tuple(tr["window_pos_embed_bkg_spatial_size"]),
            window_spec=tuple(tr["window_spec"]), global_att_blocks=tuple(tr["global_att_blocks"]),
        )
        neck = m["FpnNeck"](
            position_encoding=m["PositionEmbeddingSine"](num_pos_feats=d, normalize=True, scale=None,
                                                         temperature=10000),
            d_model=d, backbone_channel_list=list(nk["backbone_channel_list"]),
            kernel_size=int(nk.get("kernel_size", 1)), padding=int(nk.get("kernel_size", 1)) // 2,
            fpn_interp_model=nk.get("fpn_interp_model", "nearest"), fuse_type=nk.get("fuse_type", "sum"),
            fpn_top_down_levels=list(nk["fpn_top_down_levels"]),
        )
        if list(trunk.channel_list) != list(nk["backbone_channel_list"]):
            raise ConfigError(f"SAM 2 trunk channels {trunk.channel_list} do not match the neck's "
                              f"backbone_channel_list {nk['backbone_channel_list']}")
        self.image_encoder = m["ImageEncoder"](trunk=trunk, neck=neck, scalp=int(nk.get("scalp", 1)))
        self.sam_prompt_encoder = m["PromptEncoder"](
            embed_dim=d, image_embedding_size=(grid, grid), input_image_size=(self.img_size, self.img_size),
            mask_in_chans=int(cfg["prompt"]["mask_in_chans"]),
        )
        self.sam_mask_decoder = m["MaskDecoder"](
            num_multimask_outputs=int(dc["num_multimask_outputs"]),
            transformer=m["TwoWayTransformer"](depth=int(dc["depth"]), embedding_dim=d,
                                               mlp_dim=int(dc["mlp_dim"]), num_heads=int(dc["num_heads"])),
            transformer_dim=d, iou_head_depth=int(dc["iou_head_depth"]),
            iou_head_hidden_dim=int(dc["iou_head_hidden_dim"]), use_high_res_features=self.use_high_res,
            iou_prediction_use_sigmoid=bool(dc["iou_prediction_use_sigmoid"]),
            dynamic_multimask_via_stability=bool(dc.get("dynamic_multimask_via_stability", False)),
            dynamic_multimask_stability_delta=float(dc.get("dynamic_multimask_stability_delta", 0.05)),
            dynamic_multimask_stability_thresh=float(dc.get("dynamic_multimask_stability_thresh", 0.98)),
            pred_obj_scores=bool(dc["pred_obj_scores"]), pred_obj_scores_mlp=bool(dc["pred_obj_scores_mlp"]),
            use_multimask_token_for_obj_ptr=bool(dc.get("use_multimask_token_for_obj_ptr", False)),
        )
        self.directly_add_no_mem_embed = bool(cfg.get("directly_add_no_mem_embed", True))
        if not self.directly_add_no_mem_embed:
            # Without it SAM 2 runs its memory attention even on a single image: not this memory-free path.
            raise ConfigError("SAM 2 models with directly_add_no_mem_embed=false need the memory attention; "
                              "only the memory-free single-image path is supported")
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, d))
        self.pixel_mean = tuple(cfg["pixel_mean"]) if cfg.get("pixel_mean") else None
        self.pixel_std = tuple(cfg["pixel_std"]) if cfg.get("pixel_std") else None
        # channels of the folded high-res levels: conv_s0 (stride s/4) and conv_s1 (stride s/2) outputs
        self._hr = (d // 8, d // 4) if self.use_high_res else (0, 0)

    @property
    def encoder(self) -> nn.Module:
        """The image encoder (trunk + neck): what medfm's fine-tuning loop gives a lower learning rate."""
        return self.image_encoder

    @property
    def embed_dim(self) -> int:
        """Channels of ``embed_image``'s output (the stride-16 grid plus the folded high-res levels)."""
        d = int(self.config["neck"]["d_model"])
        return d + self._hr[1] * 4 + self._hr[0] * 16

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ConfigError(
                f"SAM 2 model expects {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}"
            )
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise ConfigError(f"SAM 2 model expects 1 (grey) or 3 (RGB) channels, got {x.shape[1]}")
        if self.pixel_mean is not None:
            mean = torch.tensor(self.pixel_mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.tensor(self.pixel_std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x

    def embed_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, embed_dim, h, w): SAM 2's image embedding (+ no-memory token) with
        the two high-resolution feature levels folded into extra channels."""
        fpn = self.image_encoder(self._normalise(x))["backbone_fpn"]
        levels = list(fpn[-self.num_levels :])
        low = levels[-1] + self.no_mem_embed.view(1, -1, 1, 1)
        if not self.use_high_res:
            return low
        # the same projections SAM2Base.forward_image precomputes once per image
        s0 = self.sam_mask_decoder.conv_s0(fpn[0])
        s1 = self.sam_mask_decoder.conv_s1(fpn[1])
        return torch.cat([low, F.pixel_unshuffle(s1, 2), F.pixel_unshuffle(s0, 4)], dim=1)

    def _unfold(self, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        d = int(self.config["neck"]["d_model"])
        if emb.shape[1] != self.embed_dim:
            raise ConfigError(f"SAM 2 embedding has {emb.shape[1]} channels, expected {self.embed_dim}")
        if not self.use_high_res:
            return emb, None
        c1 = self._hr[1] * 4
        s1 = F.pixel_shuffle(emb[:, d : d + c1], 2)
        s0 = F.pixel_shuffle(emb[:, d + c1 :], 4)
        return emb[:, :d], [s0, s1]

    def decode(
        self, emb: torch.Tensor, points=None, boxes=None, masks=None, multimask_output: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits at full image size (B, M, H, W) and predicted IoU (B, M) for embedded images.

        As SAM2ImagePredictor does: a box becomes two corner points (labels 2, 3) ahead of any clicks."""
        b = emb.shape[0]
        low, high = self._unfold(emb)
        concat = None
        if points is not None:
            concat = (points[0].float(), points[1].to(torch.int32))
        if boxes is not None:
            corners = boxes.float().reshape(-1, 2, 2)
            labels = torch.tensor([[2, 3]], dtype=torch.int32, device=corners.device).repeat(len(corners), 1)
            concat = (corners, labels) if concat is None else (
                torch.cat([corners, concat[0]], 1), torch.cat([labels, concat[1]], 1))
        sparse, dense = self.sam_prompt_encoder(points=concat, boxes=None, masks=masks)
        if sparse.shape[0] != b:  # no prompt at all: one empty prompt for every image
            sparse, dense = sparse.expand(b, -1, -1), dense.expand(b, -1, -1, -1)
        low_res, iou, _, _ = self.sam_mask_decoder(
            image_embeddings=low, image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=multimask_output, repeat_image=False, high_res_features=high,
        )
        return F.interpolate(
            low_res, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False
        ), iou

    def forward(self, x: torch.Tensor, points=None, boxes=None, masks=None, multimask_output: bool = True):
        return self.decode(self.embed_image(x), points, boxes, masks, multimask_output)


# ---------------------------------------------------------------------------------------------------------
# Official SAM 2 / SAM 2.1 / MedSAM2 state dicts
# ---------------------------------------------------------------------------------------------------------
# Modules SAM 2 uses for video only (memory bank, object pointers, mask-as-output path): not needed by a
# single image without memory. Their keys are counted and reported, never silently dropped.
MEMORY_PREFIXES = ("memory_attention.", "memory_encoder.", "obj_ptr_proj.", "obj_ptr_tpos_proj.",
                   "mask_downsample.")
MEMORY_KEYS = ("maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial")


def is_memory_key(key: str) -> bool:
    """A key of SAM 2's video / memory modules (skipped by the single-image path)."""
    return key in MEMORY_KEYS or key.startswith(MEMORY_PREFIXES)


def _max_index(keys: list[str], prefix: str) -> int:
    """1 + the largest integer after ``prefix`` in ``keys`` (0 when there is none)."""
    ids = [int(k[len(prefix) :].split(".")[0]) for k in keys if k.startswith(prefix)
           and k[len(prefix) :].split(".")[0].isdigit()]
    return 1 + max(ids) if ids else 0


def official_size(embed_dim: int, stages: list[int]) -> str | None:
    """The official Hiera size with this width and block counts (None for a custom one)."""
    for name, t in OFFICIAL_TRUNKS.items():
        if t["embed_dim"] == embed_dim and list(t["stages"]) == list(stages):
            return name
    return None


def config_from_state(
    sd: dict[str, torch.Tensor], path: Any = "", name: str = "", **overrides: Any
) -> tuple[dict[str, Any], dict[str, str]]:
    """(medfm config, where each architecture field came from) inferred from an official SAM 2 state dict.

    Shapes give the Hiera width, block counts per stage, first window size and background position grid,
    the neck width and channel list, and the decoder sizes; heads, global-attention blocks and later window
    sizes come from the official config of the same size. ``overrides``: ``img_size``, ``num_heads``,
    ``global_att_blocks``, ``window_spec``, ``q_pool``, ``fpn_top_down_levels``, ``decoder_heads``,
    ``iou_prediction_use_sigmoid``, ``dynamic_multimask`` (False: the raw single-mask token)."""
    from medfm.errors import InputError

    keys = list(sd)

    def need(key: str) -> torch.Tensor:
        if key not in sd:
            raise InputError(path, f"not a SAM 2 checkpoint: missing key '{key}'")
        return sd[key]

    cfg = default_config()
    src: dict[str, str] = {}
    pe = need("image_encoder.trunk.patch_embed.proj.weight")
    if tuple(pe.shape[1:]) != (3, 7, 7):
        raise InputError(path, f"SAM 2 patch embedding has shape {tuple(pe.shape)}; expected (C, 3, 7, 7)")
    embed_dim = int(pe.shape[0])
    depth = _max_index(keys, "image_encoder.trunk.blocks.")
    if depth == 0:
        raise InputError(path, "not a SAM 2 checkpoint: no image_encoder.trunk.blocks.*")
    # the first block of every later stage changes width and carries a projection
    starts = [i for i in range(depth) if f"image_encoder.trunk.blocks.{i}.proj.weight" in sd]
    bounds = [0, *starts, depth]
    stages = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    size = official_size(embed_dim, stages)
    official = OFFICIAL_TRUNKS[size] if size else None
    tr = cfg["trunk"]
    tr.update(embed_dim=embed_dim, stages=stages)
    tr["window_pos_embed_bkg_spatial_size"] = list(need("image_encoder.trunk.pos_embed").shape[2:])
    win0 = int(need("image_encoder.trunk.pos_embed_window").shape[2])
    src.update(embed_dim="shapes", stages="shapes", window_pos_embed_bkg_spatial_size="shapes")
    if len(starts) > 1:
        w = [int(sd[f"image_encoder.trunk.blocks.{s}.proj.weight"].shape[0]) for s in starts]
        tr["dim_mul"] = w[1] / w[0]
    for field in ("num_heads", "global_att_blocks", "window_spec"):
        if field in overrides and overrides[field] is not None:
            tr[field] = list(overrides[field]) if field != "num_heads" else int(overrides[field])
            src[field] = "option"
        elif official is not None:
            tr[field] = copy.deepcopy(official[field])
            src[field] = f"official config hiera_{size}"
        else:
            raise ConfigError(
                f"{path}: Hiera embed_dim {embed_dim}, stages {stages} is not an official SAM 2 size "
                f"({', '.join(OFFICIAL_TRUNKS)}); {field} is not stored in the weights: give num_heads, "
                "global_att_blocks and window_spec"
            )
    if int(tr["window_spec"][0]) != win0:
        raise InputError(path, f"window_spec {tr['window_spec']} starts at {tr['window_spec'][0]} but the "
                               f"checkpoint's window position embedding is {win0}x{win0}")
    if overrides.get("q_pool") is not None:
        tr["q_pool"], src["q_pool"] = int(overrides["q_pool"]), "option"
    else:
        tr["q_pool"] = min(3, len(stages) - 1)
    nk = cfg["neck"]
    n_convs = _max_index(keys, "image_encoder.neck.convs.")
    convs = [need(f"image_encoder.neck.convs.{i}.conv.weight") for i in range(n_convs)]
    nk["d_model"] = int(convs[0].shape[0])
    nk["backbone_channel_list"] = [int(c.shape[1]) for c in convs]
    nk["kernel_size"] = int(convs[0].shape[2])
    if overrides.get("fpn_top_down_levels") is not None:
        nk["fpn_top_down_levels"] = list(overrides["fpn_top_down_levels"])
    src.update(d_model="shapes", backbone_channel_list="shapes")
    d = nk["d_model"]
    cfg["prompt"]["mask_in_chans"] = int(need("sam_prompt_encoder.mask_downscaling.3.weight").shape[0])
    dc = cfg["decoder"]
    dc["depth"] = _max_index(keys, "sam_mask_decoder.transformer.layers.")
    dc["mlp_dim"] = int(need("sam_mask_decoder.transformer.layers.0.mlp.layers.0.weight").shape[0])
    dc["num_multimask_outputs"] = int(need("sam_mask_decoder.mask_tokens.weight").shape[0]) - 1
    dc["iou_head_depth"] = _max_index(keys, "sam_mask_decoder.iou_prediction_head.layers.")
    dc["iou_head_hidden_dim"] = int(need("sam_mask_decoder.iou_prediction_head.layers.0.weight").shape[0])
    dc["use_high_res_features"] = "sam_mask_decoder.conv_s0.weight" in sd
    dc["pred_obj_scores"] = "sam_mask_decoder.obj_score_token.weight" in sd
    dc["pred_obj_scores_mlp"] = any(k.startswith("sam_mask_decoder.pred_obj_score_head.layers.")
                                    for k in keys)
    src.update(decoder_sizes="shapes")
    if overrides.get("decoder_heads") is not None:
        dc["num_heads"], src["decoder_heads"] = int(overrides["decoder_heads"]), "option"
    for opt, field in (("iou_prediction_use_sigmoid", "iou_prediction_use_sigmoid"),
                       ("dynamic_multimask", "dynamic_multimask_via_stability")):
        if overrides.get(opt) is not None:
            dc[field], src[field] = bool(overrides[opt]), "option"
    if d % 8 or need("no_mem_embed").shape[-1] != d:
        raise InputError(path, f"no_mem_embed / neck width {d} do not fit a SAM 2 model")
    if overrides.get("img_size") is not None:
        cfg["img_size"], src["img_size"] = int(overrides["img_size"]), "option"
    elif "medsam2" in name.lower():  # MedSAM2 (Ma et al. 2025) fine-tuned SAM 2.1-T at 512 px
        cfg["img_size"], src["img_size"] = 512, "file name (MedSAM2: 512 px)"
    else:
        src["img_size"] = "official default (1024 px)"
    unknown = set(overrides) - {"img_size", "num_heads", "global_att_blocks", "window_spec", "q_pool",
                                "fpn_top_down_levels", "decoder_heads", "iou_prediction_use_sigmoid",
                                "dynamic_multimask"}
    if unknown:
        raise ConfigError(f"unknown SAM 2 option(s) {sorted(unknown)}")
    src["size"] = size or "custom"
    return cfg, src


def load_sam2_state(
    sd: dict[str, torch.Tensor], path: Any = "", name: str = "", **overrides: Any
) -> tuple[Sam2Promptable, dict[str, Any]]:
    """A :class:`Sam2Promptable` from an official state dict: every key is placed except the memory
    modules' (counted in the report); any other key that does not fit fails naming it."""
    from medfm.errors import InputError

    cfg, src = config_from_state(sd, path, name, **overrides)
    model = Sam2Promptable(cfg)
    skipped = sorted(k for k in sd if is_memory_key(k))
    mapped = {k: v for k, v in sd.items() if not is_memory_key(k)}
    own = model.state_dict()
    unexpected = sorted(k for k in mapped if k not in own)
    missing = sorted(k for k in own if k not in mapped)
    if unexpected or missing:
        raise InputError(path, f"SAM 2 checkpoint keys do not fit: unexpected {unexpected[:5]}, "
                               f"missing {missing[:5]}")
    bad = [k for k, v in mapped.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise InputError(path, f"SAM 2 shape mismatch for {bad[:3]} (e.g. {tuple(mapped[bad[0]].shape)} vs "
                               f"{tuple(own[bad[0]].shape)})")
    model.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=True)
    model.eval()
    groups = sorted({k.split(".")[0] for k in skipped})
    report = {"keys_loaded": len(mapped), "keys_skipped": len(skipped), "skipped_modules": groups,
              "inferred_from": src}
    return model, report
