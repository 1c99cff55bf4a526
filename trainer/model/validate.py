"""Config-load checks of the model against its pretrained checkpoints and the data plane, before any work.

Reads configs only (a meta-device build of the LLM, the towers' config and processor files), so a run that
cannot train stops at `plait train` / `plait config show` with the field named, and the audio front end follows
the Whisper checkpoint's processor config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from plait.trainer.config import RunConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")


def validate_model(cfg: RunConfig) -> None:
    """Check the LLM class and the pretrained towers; set the audio front end from a Whisper checkpoint.

    Raises `ValueError("<dotted field>: ...")`, which config loading reports with the config's source.
    """
    from plait.trainer.model.llm_support import check_llm_supported

    _prefixed("model.llm", check_llm_supported, cfg.model.llm)
    encoder = cfg.model.encoder
    if encoder.vision.pretrained:
        _check_vision(cfg)
    if encoder.audio.pretrained:
        _check_audio(cfg)
    if encoder.vision.pretrained and encoder.audio.pretrained and encoder.mome_layers:
        raise ValueError("model.encoder.mome_layers: both streams use pretrained towers, so plait's own encoder "
                         "blocks are not built; set it to []")


def _prefixed(field: str, fn: Callable[..., T], *args: object) -> T | None:
    """`fn(*args)`; a ValueError that names no dotted field of its own is reported under `field`.

    A checkpoint whose files cannot be read here (a hub name offline and not cached, as in `plait config show` on
    a login node) is not checked: a warning says so (building the model needs those files anyway).
    """
    try:
        return fn(*args)
    except OSError as err:
        logger.warning("%s: not checked, its files cannot be read here (%s)", field, str(err).splitlines()[0])
        return None
    except ValueError as err:
        head, _, rest = str(err).partition(": ")
        if "." in head and " " not in head:
            raise
        message = rest if head == field.rsplit(".", 1)[-1] else str(err)
        raise ValueError(f"{field}: {message}") from None


def _check_vision(cfg: RunConfig) -> None:
    """A SigLIP(2)/CLIP checkpoint whose patch size the data plane cuts; no per-sample pixel standardisation."""
    from plait.trainer.model.vision_tower import check_vision_tower

    encoder = cfg.model.encoder
    _prefixed("model.encoder.vision.pretrained", check_vision_tower, encoder.vision.pretrained, cfg.data.sizing)
    if encoder.vision_input_norm != "none":
        raise ValueError("model.encoder.vision_input_norm: must be none with a pretrained vision tower (it "
                         "normalises with its own processor's mean and std)")


def _check_audio(cfg: RunConfig) -> None:
    """Whisper: mel settings from its processor config, every frame kept (no audio token dropping)."""
    from plait.trainer.model.audio_tower import check_audio_tower, whisper_front_end

    path = cfg.model.encoder.audio.pretrained
    front = _prefixed("model.encoder.audio.pretrained", whisper_front_end, path)
    if front is None:
        return
    sizing = cfg.data.sizing
    wanted = {"n_mels": front["n_mels"], "hop_ms": front["hop_ms"]}
    changed = {k: v for k, v in wanted.items() if getattr(sizing, k) != v}
    if changed:
        logger.info("data.sizing: %s from %s's processor config", ", ".join(f"{k}={v}" for k, v in changed.items()),
                    path)
        try:
            cfg.data.sizing = replace(sizing, **changed)
        except ValueError as err:
            raise ValueError(f"data.sizing.{err}") from None
    _prefixed("model.encoder.audio.pretrained", check_audio_tower, path, cfg.data.sizing)
    drop = cfg.data.token_drop
    phases_drop = any("token_drop_rate" in p.values for p in cfg.curriculum.phases)
    if "audio" in drop.modalities and (drop.rate > 0 or phases_drop):
        raise ValueError("data.token_drop.modalities: contains audio, but the Whisper tower "
                         "(model.encoder.audio.pretrained) needs every mel frame; leave audio out")

