"""Pretrained vision towers (SigLIP2 NaFlex, SigLIP, CLIP ViT) run packed over the vision stream with their own weights.

The checkpoint's patch projection, its position table resized to each sample's grid as Hugging Face resizes it,
CLIP's class token and the encoder layers run on one packed row `[1, T, D]` with varlen attention (`plait_varlen`),
so samples of any resolution share one pass and never attend to each other. Tubelets are averaged over their
frames (exact for images, which repeat), and a learned temporal embedding, zero at init, places video tubelets:
an image sees exactly what the checkpoint computes. A new linear maps the tower's width to `out_dim`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoConfig, CLIPVisionModel, PretrainedConfig, PreTrainedModel, Siglip2VisionModel,
                          SiglipVisionModel)
from transformers.image_processing_base import ImageProcessingMixin
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from plait.data.batch import PackedStream
from plait.data.sizing import SizingConfig
from plait.ops.attention import Backend
from plait.trainer.model.hf_attention import PLAIT_VARLEN, varlen_kwargs
from plait.trainer.model.hub import from_checkpoint
from plait.trainer.model.llm import _seeded_init_partitioned

logger = logging.getLogger(__name__)

FIELD = "model.encoder.vision.pretrained"
"""Config field that names the tower (for error messages)."""

VISION_MODELS: dict[str, type[PreTrainedModel]] = {
    "siglip": SiglipVisionModel, "siglip2": Siglip2VisionModel, "clip": CLIPVisionModel,
}
"""Vision model class per supported family: the model type of a full checkpoint (vision-only ones append
`_vision_model`)."""

NAFLEX = "siglip2"
"""The family with NaFlex patches (a Linear over (p, p, C) values) and bilinear antialiased position resizing."""


def vision_config(name_or_path: str) -> tuple[str, PretrainedConfig]:
    """The checkpoint's family and vision config (a full checkpoint nests it as `vision_config`); reads configs only."""
    config = AutoConfig.from_pretrained(name_or_path)
    family = config.model_type.removesuffix("_vision_model")
    if family not in VISION_MODELS:
        raise ValueError(f"{FIELD}: {name_or_path} is a {config.model_type!r} checkpoint; supported are "
                         f"{', '.join(VISION_MODELS)} and their vision models")
    return family, getattr(config, "vision_config", config)


def image_normalization(name_or_path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) from the checkpoint's image processor config (identity if it has
    `do_normalize: false`)."""
    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(name_or_path)
    except OSError as err:
        raise ValueError(f"{FIELD}: {name_or_path} has no image processor config (preprocessor_config.json), "
                         "which gives the tower's image mean and std") from err
    if not processor.get("do_normalize", True):
        return (0.0,) * 3, (1.0,) * 3
    if processor.get("image_mean") is None or processor.get("image_std") is None:
        raise ValueError(f"{FIELD}: the image processor config of {name_or_path} has no image_mean / image_std")
    mean, std = (tuple(torch.as_tensor(processor[k], dtype=torch.float64).expand(3).tolist())
                 for k in ("image_mean", "image_std"))
    return mean, std


def check_vision_tower(name_or_path: str, sizing: SizingConfig) -> None:
    """Config-load check, from configs alone: a supported family, the data's patch size, a processor config."""
    _, config = vision_config(name_or_path)
    if config.patch_size != sizing.patch_size:
        raise ValueError(f"data.sizing.patch_size: {sizing.patch_size} but {name_or_path} has patch size "
                         f"{config.patch_size}")
    image_normalization(name_or_path)


def load_vision_model(name_or_path: str, load_weights: bool = True) -> tuple[str, PreTrainedModel]:
    """The family and vision model of a full or vision-only checkpoint; `load_weights=False`: architecture only."""
    family, config = vision_config(name_or_path)
    model_cls = VISION_MODELS[family]
    if load_weights:
        return family, model_cls.from_pretrained(name_or_path)
    with _seeded_init_partitioned():
        return family, model_cls._from_config(config)


class PackedSelfAttention(nn.Module):
    """A CLIP / SigLIP attention's own projections, attending through the configured attention function with the
    layer kwargs (the packed bounds): HF's SigLIP attention drops them before its attention call."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.config = attn.config
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.dropout = attn.dropout
        self.is_causal = False
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
        """Attention output `[B, T, D]` of `hidden_states [B, T, D]` (explicit head shapes: T may be 0)."""
        rows = hidden_states.shape[:-1]
        q, k, v = (proj(hidden_states).view(*rows, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, _ = attention(self, q, k, v, attention_mask, scaling=self.scale,
                           dropout=self.dropout if self.training else 0.0, **kwargs)
        return self.out_proj(out.reshape(*rows, self.num_heads * self.head_dim)), None


@dataclass
class PackedLayout:
    """Where each token's position row lies and how the packed row is laid out, from host metadata only."""

    shapes: list[tuple[int, int]]
    """Distinct (h, w) grids of the stream's samples; their resized position tables are concatenated in this order."""
    position_base: torch.Tensor
    """[T] int64 first row of each token's grid table in the concatenation."""
    position_width: torch.Tensor
    """[T] int64 grid width of each token's sample."""
    order: torch.Tensor | None
    """[T + S] int64 rows of `cat(patch tokens, class tokens)` in packed order (CLIP); None without class tokens."""
    seg: torch.Tensor
    """[T'] int64 batch position of each packed token."""
    cu_seqlens: torch.Tensor
    """Attention segment bounds of the packed row (class tokens join their sample's first segment)."""
    max_seqlen: int
    """Upper bound on the longest segment."""


def packed_layout(stream: PackedStream, class_token: bool) -> PackedLayout:
    """The layout of `stream` (tail padding removed), built on the host and copied to the stream's device."""
    if stream.samples is None or stream.grids is None or stream.kept is None:
        raise ValueError("vision stream: the tower needs the host fields samples, grids and kept")
    device = stream.patches.device
    hw = stream.grids[:, 1:]
    shapes, inverse = torch.unique(hw, dim=0, return_inverse=True)
    sizes = shapes.prod(1)
    base = torch.repeat_interleave((sizes.cumsum(0) - sizes)[inverse], stream.kept)
    width = torch.repeat_interleave(hw[:, 1], stream.kept)
    seg, cu, max_seqlen, order = stream.seg, stream.cu_seqlens, stream.max_seqlen, None
    if class_token:
        num_tokens, num_samples = int(stream.kept.sum()), len(stream.kept)
        starts = stream.kept.cumsum(0) - stream.kept
        order = torch.empty(num_tokens + num_samples, dtype=torch.long)
        order[starts + torch.arange(num_samples)] = num_tokens + torch.arange(num_samples)
        token_slots = torch.arange(num_tokens) + torch.repeat_interleave(torch.arange(1, num_samples + 1), stream.kept)
        order[token_slots] = torch.arange(num_tokens)
        seg = torch.repeat_interleave(stream.samples, stream.kept + 1).to(device)
        cu = cu.long()  # each bound moves by the class tokens placed before it
        cu = cu + torch.searchsorted(starts.to(device), cu, side="left")
        max_seqlen += 1
        order = order.to(device)
    return PackedLayout([tuple(s) for s in shapes.tolist()], base.to(device), width.to(device), order, seg, cu,
                        max_seqlen)


class PackedPatchEmbedding(nn.Module):
    """The checkpoint's patch projection, position table and class token (its own parameters, so ZeRO-3 gathers
    them for this module's forward), a temporal table, and the processor's per-channel normalisation."""

    def __init__(self, family: str, embeddings: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 temporal_patch: int, max_frames: int) -> None:
        super().__init__()
        self.family = family
        self.patch_size = embeddings.patch_size
        self.temporal_patch = temporal_patch
        projection = embeddings.patch_embedding
        self.patch_weight = projection.weight  # Conv2d [D, 3, p, p] or NaFlex Linear [D, p*p*3], as saved
        self.register_parameter("patch_bias", projection.bias)
        self.position = embeddings.position_embedding.weight  # [(1 +) g*g, D] square grid, CLIP's class row first
        self.register_parameter("class_embedding", getattr(embeddings, "class_embedding", None))
        dim = self.position.shape[1]
        self.grid_side = math.isqrt(self.position.shape[0] - (self.class_embedding is not None))
        self.temporal = nn.Parameter(torch.zeros(max_frames, dim, dtype=self.position.dtype))  # by tubelet t
        self.mean, self.std = mean, std  # host floats: no buffer, so a bf16 model keeps them exact

    def project(self, patches: torch.Tensor) -> torch.Tensor:
        """`[T, D]` patch embeddings of `[T, 3*tp*p*p]` patches in [0, 1]: frames averaged, normalised, projected."""
        area = self.patch_size**2
        pixels = patches.reshape(patches.shape[0], 3, self.temporal_patch, area).float().mean(2)
        mean, std = (torch.tensor(v, device=pixels.device)[:, None] for v in (self.mean, self.std))
        pixels = (pixels - mean) / std
        weight = self.patch_weight
        if self.family == NAFLEX:  # its inputs are (p, p, C)-flattened; the stream's are (C, p, p)
            weight = weight.view(weight.shape[0], area, 3).transpose(1, 2)
        weight = weight.reshape(weight.shape[0], 3 * area)
        return F.linear(pixels.flatten(1).to(weight.dtype), weight, self.patch_bias)

    def resized(self, grid: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """`[h*w, D]` position table of an h x w grid, resized from the learned g x g one as HF does."""
        g = self.grid_side
        if self.family != NAFLEX and (h, w) == (g, g):  # HF's interpolate_pos_encoding keeps the native table
            return grid
        square = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
        if self.family == NAFLEX:
            out = F.interpolate(square, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        else:
            out = F.interpolate(square, size=(h, w), mode="bicubic", align_corners=False)
        return out[0].permute(1, 2, 0).reshape(h * w, -1).to(grid.dtype)

    def positions(self, coords: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """`[T, D]` position rows of tokens at `coords [T, 3]`: each distinct grid resized once, then gathered."""
        grid = self.position[int(self.class_embedding is not None):]
        tables = [self.resized(grid, h, w) for h, w in layout.shapes]
        table = torch.cat(tables) if tables else grid[:0]
        return table[layout.position_base + coords[:, 1] * layout.position_width + coords[:, 2]]

    def forward(self, patches: torch.Tensor, coords: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """`[T', D]` input embeddings of the packed row (CLIP: a class token before each sample)."""
        x = self.project(patches) + self.positions(coords, layout) + self.temporal[coords[:, 0]]
        if layout.order is None:
            return x
        num_samples = layout.order.shape[0] - x.shape[0]
        cls = (self.class_embedding + self.position[0]).expand(num_samples, -1)
        return torch.cat([x, cls.to(x.dtype)])[layout.order]


class VisionTower(nn.Module):
    """A pretrained SigLIP2 NaFlex, SigLIP or CLIP vision tower over the packed vision stream, projected to
    `out_dim`.

    `load_weights=False` builds the architecture only (a saved plait model brings the weights). Attention runs as
    `plait_varlen` with `backend` (stored as `config.plait_attention_backend`).
    """

    def __init__(self, name_or_path: str, sizing: SizingConfig, out_dim: int, max_frames: int,
                 backend: Backend = "auto", load_weights: bool = True) -> None:
        super().__init__()
        def load() -> tuple[str, PreTrainedModel]:
            check_vision_tower(name_or_path, sizing)
            return load_vision_model(name_or_path, load_weights)

        family, model = from_checkpoint(FIELD, name_or_path, load)
        model.set_attn_implementation(PLAIT_VARLEN)
        model.config.plait_attention_backend = backend
        self.config = model.config
        self.family = family
        mean, std = image_normalization(name_or_path)
        self.embed = PackedPatchEmbedding(family, model.embeddings, mean, std, sizing.temporal_patch, max_frames)
        self.pre_norm = getattr(model, "pre_layrnorm", nn.Identity())
        self.encoder = model.encoder
        for layer in self.encoder.layers:
            layer.self_attn = PackedSelfAttention(layer.self_attn)
        # HF applies post_layernorm to SigLIP's last_hidden_state; CLIP's only to the pooled class token.
        self.post_norm = nn.Identity() if family == "clip" else model.post_layernorm
        self.proj = nn.Linear(self.config.hidden_size, out_dim)
        logger.info("vision tower %s: %s, width %d, %d layers, weights %s", name_or_path, family,
                    self.config.hidden_size, len(self.encoder.layers), "loaded" if load_weights else "not loaded")

    def features(self, stream: PackedStream) -> tuple[torch.Tensor, torch.Tensor]:
        """The tower's own output (HF's last_hidden_state) `[T', hidden]` of a stream without tail padding, and each
        token's batch position `[T']` (CLIP: T' = T + one class token per sample)."""
        layout = packed_layout(stream, class_token=self.embed.class_embedding is not None)
        x = self.pre_norm(self.embed(stream.patches, stream.coords, layout))
        x = self.encoder(inputs_embeds=x[None], **varlen_kwargs(layout.cu_seqlens, layout.max_seqlen))
        return self.post_norm(x.last_hidden_state[0]), layout.seg

    def forward(self, stream: PackedStream) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens `[T', out_dim]` of a stream without tail padding and their batch positions `[T']`."""
        x, seg = self.features(stream)
        return self.proj(x), seg
