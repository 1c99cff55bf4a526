"""Model configuration: encoder, resampler, LLM and MoME layers (plain dataclasses, every field documented).

The defaults build the tiny CPU quickstart model (~2.5M parameters with a 2k-token vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from plait.data.checks import check_positive


def _check_layers(layers: list[int], depth: Optional[int]) -> None:
    """MoME layer indices must be distinct and inside [0, depth)."""
    if len(set(layers)) != len(layers):
        raise ValueError(f"mome_layers: duplicate layer index in {layers}")
    if depth is not None and any(not 0 <= i < depth for i in layers):
        raise ValueError(f"mome_layers: indices {layers} must lie in [0, {depth})")


@dataclass
class MoMEConfig:
    """Mixture-of-Modality-Experts FFNs (shared by the encoder and LLM layers listed in their `mome_layers`)."""

    num_experts: int = 4
    """Routed experts per MoME layer."""
    top_k: int = 2
    """Experts each token is sent to."""
    router: Literal["per_modality", "modality_embedding"] = "per_modality"
    """Modality awareness: one router per token modality, or one router fed token + learned modality embedding."""
    router_bias: bool = False
    """Learn a per-modality bias on the router logits (a modality prior over experts)."""
    capacity_factor: Optional[float] = None
    """Expert capacity = ceil(factor * tokens * top_k / num_experts) assignments; None is dropless."""
    normalize_topk: bool = True
    """Renormalise the top-k router probabilities to sum to one per token."""
    shared_expert: bool = False
    """Add an always-on shared expert (same size as one routed expert) to every MoME layer."""
    init: Literal["upcycle", "fresh"] = "upcycle"
    """`upcycle`: every expert starts as a copy of the dense FFN it replaces (sparse upcycling); `fresh`: random."""
    init_std: float = 0.02
    """Standard deviation of fresh expert and router weights."""

    def __post_init__(self) -> None:
        check_positive(self, "num_experts", "top_k", "init_std")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: {self.top_k} exceeds num_experts {self.num_experts}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor: must be positive or null, got {self.capacity_factor}")


@dataclass
class TowerConfig:
    """A pretrained Hugging Face encoder for one stream, run packed (varlen) with its own weights."""

    pretrained: Optional[str] = None
    """Hub name or local directory: SigLIP2 NaFlex, SigLIP or CLIP (vision), Whisper (audio); its processor
    config gives the preprocessing. Null: plait's own packed encoder takes this stream."""


@dataclass
class EncoderConfig:
    """Packed NaViT-style transformer over the vision (images, video) and audio patch streams (patch sizes: data.sizing)."""

    dim: int = 128
    """Width of the encoder."""
    depth: int = 2
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads (must divide `dim`)."""
    ffn_hidden: int = 352
    """Hidden width of the gated (SwiGLU) FFN."""
    vision_input_norm: Literal["none", "sample"] = "none"
    """`sample`: standardise each image/video by the mean and std of all its patch values before the projection
    (per-image standardisation: contrast and brightness no longer vary by colour pair); `none`: raw values."""
    vision_max_grid: list[int] = field(default_factory=lambda: [64, 64, 64])
    """Sizes of the learned (t, h, w) position tables of the vision stream."""
    audio_max_grid: list[int] = field(default_factory=lambda: [8, 256, 256])
    """Sizes of the learned (t, h, w) position tables of the audio stream."""
    mome_layers: list[int] = field(default_factory=lambda: [1])
    """Blocks whose FFN is a MoME layer (VLMo puts modality experts in every layer)."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass to save activation memory."""
    norm_eps: float = 1e-6
    """LayerNorm epsilon."""
    vision: TowerConfig = field(default_factory=TowerConfig)
    """Pretrained vision tower (images and video); its tokens are projected to `dim`."""
    audio: TowerConfig = field(default_factory=TowerConfig)
    """Pretrained audio tower; its tokens are projected to `dim`."""

    def __post_init__(self) -> None:
        check_positive(self, "dim", "depth", "num_heads", "ffn_hidden", "norm_eps")
        if self.dim % self.num_heads:
            raise ValueError(f"num_heads: {self.num_heads} does not divide dim {self.dim}")
        for name in ("vision_max_grid", "audio_max_grid"):
            grid = getattr(self, name)
            if len(grid) != 3 or min(grid) <= 0:
                raise ValueError(f"{name}: needs three positive sizes (t, h, w), got {grid}")
        _check_layers(self.mome_layers, self.depth)


@dataclass
class ResamplerConfig:
    """Perceiver resampler: K learned latents per sample cross-attend to that sample's encoder tokens."""

    dim: int = 128
    """Width of the latents."""
    depth: int = 2
    """Cross-attention + FFN layers (Flamingo: 6)."""
    num_latents: int = 16
    """Latents per sample, K (Flamingo: 64)."""
    num_heads: int = 4
    """Attention heads (must divide `dim`)."""
    ffn_hidden: int = 352
    """Hidden width of the gated FFN."""
    norm_eps: float = 1e-6
    """LayerNorm epsilon."""

    def __post_init__(self) -> None:
        check_positive(self, "dim", "depth", "num_latents", "num_heads", "ffn_hidden", "norm_eps")
        if self.dim % self.num_heads:
            raise ValueError(f"num_heads: {self.num_heads} does not divide dim {self.dim}")


def _tiny_llama() -> dict[str, int | float | str | bool]:
    """Kwargs of the tiny Llama used by the quickstart and the tests."""
    return {
        "vocab_size": 2048,
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
    }


@dataclass
class LoRAConfig:
    """Low-rank adapters (peft LoRA) on the LLM's linear layers; the LLM's own weights stay frozen."""

    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Scale numerator: adapter outputs are multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names (or suffixes) that get adapters; `all-linear` is every linear layer but the output head."""

    def __post_init__(self) -> None:
        check_positive(self, "r", "alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules: name at least one module (or all-linear)")


@dataclass
class LLMConfig:
    """Causal LM: a hub checkpoint, or a model built from `model_type` + `model_kwargs` (tests, quickstart)."""

    name_or_path: Optional[str] = None
    """Hub name or local directory for `AutoModelForCausalLM.from_pretrained`; null builds from the fields below."""
    tokenizer: Optional[str] = None
    """Caption tokenizer (hub name or directory); null: the LLM's own, or for a model built from config a
    byte-level BPE trained on the dataset's captions and saved in the run directory."""
    model_type: str = "llama"
    """transformers model type for `AutoConfig.for_model` (llama, qwen2, mistral, ...)."""
    model_kwargs: dict[str, int | float | str | bool] = field(default_factory=_tiny_llama)
    """Config kwargs for `AutoConfig.for_model` (ignored with `name_or_path`)."""
    attn_implementation: Literal["plait_varlen", "sdpa", "flash_attention_2", "eager"] = "plait_varlen"
    """Attention: plait's varlen dispatch (flash-attn / torch varlen / bucketed SDPA) or a transformers backend."""
    mome_layers: list[int] = field(default_factory=lambda: [1])
    """Decoder layers whose MLP becomes a MoME layer."""
    gradient_checkpointing: bool = False
    """Recompute decoder layers in the backward pass (non-reentrant)."""
    lora: Optional[LoRAConfig] = None
    """LoRA adapters on the LLM (null: the LLM trains in full, unless a curriculum phase freezes it)."""

    def __post_init__(self) -> None:
        if not self.model_type:
            raise ValueError("model_type: must name a transformers model type")
        _check_layers(self.mome_layers, None)


@dataclass
class ModelConfig:
    """The whole model: encoder -> resampler -> LLM, MoME settings and the contrastive embedding size."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """Packed media encoder."""
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    """Perceiver resampler (connector)."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """Causal language model."""
    mome: MoMEConfig = field(default_factory=MoMEConfig)
    """Mixture-of-Modality-Experts layers."""
    embed_dim: int = 128
    """Size of the media and text embeddings fed to the contrastive loss."""
    attention_backend: Literal["auto", "flash", "torch_varlen", "bucketed", "reference"] = "auto"
    """Varlen attention path of the encoder, resampler and `plait_varlen` LLM attention."""

    def __post_init__(self) -> None:
        check_positive(self, "embed_dim")
