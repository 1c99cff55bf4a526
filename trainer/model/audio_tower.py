"""A pretrained Whisper encoder as plait's audio tower, run packed (varlen) with its own weights.

The audio stream's log-mel patches are reshaped back into mel frames, Whisper's two convolutions run on the
whole packed row with zero frames between clips (so each clip sees the zero padding of a per-clip call), positions
restart per clip and stop at its length (no padding to 30 s), and the encoder layers attend clip by clip through
`plait_varlen`. A new linear layer projects the tokens to `out_dim`. Dropout follows the checkpoint's
config; attention dropout (`plait_varlen` has none) and layerdrop (ZeRO-3 ranks must run every layer) do not.

Front end: plait's `log_mel` equals `WhisperFeatureExtractor` on an unpadded clip (`padding="longest"`). With
Whisper's default padding to 30 s before the max-8 clamp, only a clip's last frame differs (its window reads
zeros past the end instead of plait's reflection); the clamp and every other frame are the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PretrainedConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from plait.data.batch import PackedStream
from plait.data.preprocess import log_mel_config
from plait.data.sizing import SizingConfig
from plait.ops.attention import Backend
from plait.ops.segments import cu_to_lengths, lengths_to_cu, segment_positions
from plait.trainer.model.hf_attention import PLAIT_VARLEN, varlen_kwargs
from plait.trainer.model.hub import from_checkpoint
from plait.trainer.model.llm import _seeded_init_partitioned

ENCODER_KEYS = {r"^(model\.)?encoder\.": ""}
"""Checkpoint key renames onto a bare WhisperEncoder: WhisperForConditionalGeneration (`model.encoder.`) and
WhisperModel (`encoder.`); an encoder-only checkpoint's keys are already bare."""


class _CheckpointWhisperEncoder(WhisperEncoder):
    """WhisperEncoder read out of a full Whisper checkpoint: the decoder's weights are skipped without a report."""

    _keys_to_ignore_on_load_unexpected = [r"decoder\."]


def load_whisper_encoder(name_or_path: str, load_weights: bool = True) -> WhisperEncoder:
    """The encoder of a Whisper checkpoint (full or encoder-only) in fp32; `load_weights=False`: architecture only.

    Under `llm.transformers_zero3` and zero.Init it is created partitioned, as the LLM is.
    """
    if load_weights:
        return _CheckpointWhisperEncoder.from_pretrained(name_or_path, key_mapping=ENCODER_KEYS, dtype=torch.float32)
    config = AutoConfig.from_pretrained(name_or_path)
    with _seeded_init_partitioned():
        return _CheckpointWhisperEncoder(config)


def whisper_front_end(name_or_path: str) -> dict:
    """The log-mel settings of a Whisper checkpoint's feature extractor (preprocessor_config.json)."""
    extractor = WhisperFeatureExtractor.from_pretrained(name_or_path)
    return {"n_mels": extractor.feature_size, "hop_ms": 1000.0 * extractor.hop_length / extractor.sampling_rate,
            "sample_rate": extractor.sampling_rate, "n_fft": extractor.n_fft}


def max_clip_frames(sizing: SizingConfig) -> int:
    """Most mel frames of one clip: max_audio_seconds in whole audio patches (as `data.sizing` crops)."""
    patches = math.floor(sizing.max_audio_seconds * (1000.0 / sizing.hop_ms) / sizing.audio_patch)
    return max(patches, 1) * sizing.audio_patch


def check_geometry(config: PretrainedConfig, sizing: SizingConfig, name_or_path: str) -> None:
    """The sizing fits the encoder: its mel bins, even clip lengths (conv2 halves them), clips within its positions."""
    if sizing.n_mels != config.num_mel_bins:
        raise ValueError(f"data.sizing.n_mels: {sizing.n_mels}, but the Whisper encoder {name_or_path} takes "
                         f"num_mel_bins={config.num_mel_bins}")
    if sizing.audio_patch % 2:
        raise ValueError(f"data.sizing.audio_patch: must be even for a Whisper audio tower (clips of whole patches "
                         f"then have an even frame count), got {sizing.audio_patch}")
    frames = max_clip_frames(sizing)
    if frames > 2 * config.max_source_positions:
        raise ValueError(f"data.sizing.max_audio_seconds: {sizing.max_audio_seconds} s is {frames} mel frames, more "
                         f"than the {2 * config.max_source_positions} of {name_or_path} (max_source_positions "
                         f"{config.max_source_positions})")


def check_audio_tower(name_or_path: str, sizing: SizingConfig) -> None:
    """Config-load check that `model.encoder.audio.pretrained` is a Whisper whose front end plait's log-mel matches."""
    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type != "whisper":
        raise ValueError(f"model.encoder.audio.pretrained: {name_or_path} is a {config.model_type!r} model, the "
                         f"audio tower takes Whisper")
    front = whisper_front_end(name_or_path)
    if sizing.n_mels != front["n_mels"]:
        raise ValueError(f"data.sizing.n_mels: {sizing.n_mels}, but the feature extractor of {name_or_path} has "
                         f"feature_size={front['n_mels']}")
    if not math.isclose(sizing.hop_ms, front["hop_ms"]):
        raise ValueError(f"data.sizing.hop_ms: {sizing.hop_ms}, but the feature extractor of {name_or_path} hops "
                         f"{front['hop_ms']} ms")
    mel = log_mel_config(sizing)
    for name, ours in (("sample_rate", mel.sample_rate), ("n_fft", mel.n_fft)):
        if front[name] != ours:
            raise ValueError(f"model.encoder.audio.pretrained: the feature extractor of {name_or_path} has "
                             f"{name}={front[name]}, plait's log-mel front end (LogMelConfig.{name}) {ours}")
    check_geometry(config, sizing, name_or_path)


def clip_frames(stream: PackedStream, sizing: SizingConfig) -> torch.Tensor:
    """[S] int64 host: mel frames of each clip of the audio stream, from its host grids (every token present)."""
    if stream.grids is None or stream.kept is None or stream.samples is None:
        raise ValueError("audio stream: the Whisper tower needs the host grids, kept and samples of the stream")
    grids = stream.grids.long()
    total = grids.prod(1)
    if bool((stream.kept < total).any()):
        raise ValueError(f"audio stream: {int(stream.kept.sum())} of {int(total.sum())} tokens kept; a Whisper "
                         f"tower needs every frame, so token dropping must exclude audio "
                         f"(data.token_drop.modalities)")
    mel_patches = sizing.n_mels // sizing.audio_patch
    if bool(((grids[:, 0] != 1) | (grids[:, 2] != mel_patches)).any()):
        raise ValueError(f"audio stream: grids {grids.tolist()} are not (1, time, {mel_patches}) log-mel grids of "
                         f"data.sizing.n_mels={sizing.n_mels}")
    return grids[:, 1] * sizing.audio_patch


class AudioTower(nn.Module):
    """Whisper encoder over the packed audio stream: tokens `[T', out_dim]` (half a clip's frames each) and seg."""

    def __init__(self, name_or_path: str, sizing: SizingConfig, out_dim: int, backend: Backend = "auto",
                 load_weights: bool = True) -> None:
        super().__init__()
        self.sizing = sizing
        self.encoder = from_checkpoint("model.encoder.audio.pretrained", name_or_path,
                                       lambda: load_whisper_encoder(name_or_path, load_weights))
        check_geometry(self.encoder.config, sizing, name_or_path)
        self.encoder.set_attn_implementation(PLAIT_VARLEN)
        self.encoder.config.plait_attention_backend = backend
        self.proj = nn.Linear(self.encoder.config.d_model, out_dim)

    def mel_frames(self, patches: torch.Tensor) -> torch.Tensor:
        """Packed patches `[T, p*p]` (time patch, mel patch; each time p x mel p) → packed frames `[F, n_mels]`."""
        p = self.sizing.audio_patch
        blocks = patches.reshape(-1, self.sizing.n_mels // p, p, p)
        return blocks.permute(0, 2, 1, 3).reshape(-1, self.sizing.n_mels)

    def convolve(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Whisper's conv1 + GELU, conv2 (stride 2) + GELU of each clip, on one row: `[F, n_mels]` → `[F/2 + 1, D]`.

        Clip k sits behind two zero frames, at an even offset, so both convolutions see a clip edge as their zero
        padding; conv1's outputs between clips are zeroed again before conv2. The last row is the spare output of
        two trailing zero frames (see `forward`). Offsets come from host `lengths`.
        """
        device = frames.device
        clip = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        at = torch.arange(len(clip)) + 2 * (clip + 1)
        size = len(clip) + 2 * len(lengths) + 2
        real = torch.zeros(size).index_fill_(0, at, 1.0)
        at = at.to(device, non_blocking=True)
        row = frames.new_zeros(size, frames.shape[1]).index_copy(0, at, frames).T[None]
        hidden = F.gelu(self.encoder.conv1(row)) * real.to(device, frames.dtype, non_blocking=True)
        hidden = F.gelu(self.encoder.conv2(hidden))[0].T
        kept = torch.arange(len(clip) // 2) + torch.repeat_interleave(torch.arange(len(lengths)), lengths // 2) + 1
        return hidden[torch.cat([kept, kept.new_tensor([size // 2 - 1])]).to(device, non_blocking=True)]

    def forward(self, stream: PackedStream) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens `[T', out_dim]` of the stream's clips (tail padding removed) and their batch positions `[T']`.

        A spare row rides through the layers as its own one-token segment and is dropped before the final norm:
        Whisper's attention cannot reshape zero rows, and so an empty stream still runs every module.
        """
        lengths = clip_frames(stream, self.sizing)
        encoder = self.encoder
        frames = self.mel_frames(stream.patches[: stream.num_tokens].to(encoder.conv1.weight.dtype))
        hidden = self.convolve(frames, lengths)
        tokens = lengths // 2
        cu = lengths_to_cu(torch.cat([tokens, tokens.new_ones(1)]))
        positions = segment_positions(cu, len(hidden)).to(hidden.device, non_blocking=True)
        hidden = hidden + encoder.embed_positions(positions)
        hidden = F.dropout(hidden, p=encoder.dropout, training=self.training)[None]
        bounds = varlen_kwargs(cu.to(hidden.device, non_blocking=True), int(cu_to_lengths(cu).max()))
        for layer in encoder.layers:
            hidden = layer(hidden, None, **bounds)
        out = self.proj(encoder.layer_norm(hidden[0, :-1]))
        seg = torch.repeat_interleave(stream.samples, tokens).to(out.device, non_blocking=True)
        return out, seg
