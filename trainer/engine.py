"""The DeepSpeed engine: one module (model + objective) wrapped by `deepspeed.initialize` with ZeRO 0-3,
optional CPU offload, bf16 on GPU / fp32 on CPU, gradient accumulation, clipping and per-group LR.

The objective lives inside the wrapped module so the learnable temperature is optimised and the negative
queues (buffers) are saved and restored with the model by DeepSpeed's checkpoints. A curriculum phase that changes
which parameters are frozen gets a new engine on the same module (`rebuild_engine`, see `freezing.py`).
"""

from __future__ import annotations

import os
import socket
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from plait.data.batch import PackedBatch
from plait.data.sizing import SizingConfig
from plait.trainer.config import RunConfig
from plait.trainer.freezing import (capture_optimizer_state, carry_optimizer_state, release_engine, set_trainable,
                                    trainable_names)
from plait.trainer.losses.config import LossConfig
from plait.trainer.losses.objective import Objective, ObjectiveInputs
from plait.trainer.model.config import ModelConfig
from plait.trainer.model.mome import assignment_counts, mark_zero3_leaf_modules
from plait.trainer.model.multimodal import MultimodalModel
from plait.trainer.optim import build_optimizer


@dataclass
class TrainOutput:
    """One micro-batch's loss to backpropagate and what gets logged."""

    loss: torch.Tensor
    """Weighted total loss (this rank's share)."""
    components: dict[str, torch.Tensor]
    """Detached 0-dim loss components and statistics from the objective."""
    counters: dict[str, int]
    """Model counters (encoder/LLM tokens, capacity drops)."""
    expert_counts: torch.Tensor
    """[layers, token modalities, experts] int64 router assignments (empty without MoME layers)."""
    captioning: bool
    """Whether the model ran the captioning sequences (the caption loss weight is above 0)."""


class TrainModule(nn.Module):
    """What DeepSpeed wraps: `model` (encoder -> resampler -> LLM) and `objective` (losses, temperature, queues)."""

    def __init__(self, model_cfg: ModelConfig, sizing: SizingConfig, loss_cfg: LossConfig) -> None:
        super().__init__()
        self.model = MultimodalModel(model_cfg, sizing)
        self.objective = Objective(loss_cfg, model_cfg.embed_dim)
        self.fixed_frozen: frozenset[str] = frozenset()
        """Parameters the model itself keeps frozen (LoRA's base weights): no curriculum phase trains them."""

    def forward(self, batch: PackedBatch, step: int, weights: dict[str, float] | None = None,
                hard_fraction: float | None = None) -> TrainOutput:
        """Model forward and every loss of one packed micro-batch at optimizer step `step`."""
        captioning = self.objective.captioning(self.objective.weights(weights))
        out = self.model(batch, captioning=captioning)
        inputs = ObjectiveInputs(
            media_embeds=out.media_embeds,
            text_embeds=out.text_embeds,
            modality=batch.host_modality,
            sample_key=batch.sample_key,
            group=batch.group,
            caption_id=batch.caption_key,
            caption_logits=out.caption_logits,
            caption_targets=out.caption_targets,
            router_outputs=out.router_outputs,
        )
        result = self.objective(inputs, step=step, weights=weights, hard_fraction=hard_fraction)
        experts = self.model.cfg.mome.num_experts
        counts = [assignment_counts(r, experts) for r in out.router_outputs]
        expert_counts = torch.stack(counts) if counts else torch.zeros(0, 0, experts, dtype=torch.long,
                                                                                   device=out.media_embeds.device)
        return TrainOutput(result.loss, result.components, out.counters, expert_counts.detach(), captioning)

    @torch.no_grad()
    def embed(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(media, text) embeddings of a batch, L2-normalised, for retrieval evaluation."""
        out = self.model(batch, captioning=False)
        return (nn.functional.normalize(out.media_embeds.float(), dim=-1),
                nn.functional.normalize(out.text_embeds.float(), dim=-1))


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SLURM_ENV = {"RANK": "SLURM_PROCID", "WORLD_SIZE": "SLURM_NTASKS", "LOCAL_RANK": "SLURM_LOCALID"}
"""torch.distributed variables and the SLURM ones they come from under `srun` (one task per GPU)."""


def init_distributed() -> None:
    """Join the launcher's process group (deepspeed, torchrun, srun), or make one of a single rank in-process.

    On CUDA the local rank's device becomes the current one first, so everything built next lands there.
    """
    import deepspeed

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ.update({name: os.environ[slurm] for name, slurm in SLURM_ENV.items()})
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise RuntimeError(f"srun without a launcher: set {' and '.join(missing)} (e.g. the first node's "
                               "hostname and a free port) in the job script")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    if "RANK" not in os.environ:
        _init_single_rank(backend)
    deepspeed.init_distributed(dist_backend=backend)


def _init_single_rank(backend: str) -> None:
    """A one-rank group on a store that binds its own port (no window for another process to take it), and the
    environment DeepSpeed reads so it does not go looking for mpi4py."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, 1, is_master=True)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port))
    torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1)


def local_rank() -> int:
    """This process's rank on its node (`LOCAL_RANK`, set by every launcher or from SLURM)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def uses_bf16(cfg: RunConfig) -> bool:
    """bf16 when asked, or `auto` on a GPU (fp32 on CPU, where bf16 is ~4x slower)."""
    precision = cfg.deepspeed.precision
    return precision == "bf16" or (precision == "auto" and torch.cuda.is_available())


def deepspeed_config(cfg: RunConfig, load_universal: bool = False) -> dict:
    """The DeepSpeed config dict: the optional JSON file, overridden by the run config's values.

    `load_universal` reads a universal checkpoint (resuming at another world size).
    """
    ds = cfg.deepspeed
    base = ds.file_config
    zero = {**base.get("zero_optimization", {}), "stage": ds.stage}
    if ds.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
        if ds.stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {
        **base,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": uses_bf16(cfg)},
        "fp16": {"enabled": False},
        # torch AdamW as client optimizer builds no JIT extension and gives the same updates.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {**base.get("checkpoint", {}), "load_universal": load_universal},
    }


def build_module(cfg: RunConfig, ds_config: dict) -> TrainModule:
    """The module from `cfg.seed`, the same on every rank; at ZeRO-3 built under `zero.Init`.

    There every parameter, a pretrained LLM's included, is created partitioned, so no rank ever holds the whole
    model; the gathered values are those of a plain build from the same seed.
    """
    import deepspeed

    from plait.trainer.model.llm import transformers_zero3

    torch.manual_seed(cfg.seed)
    with ExitStack() as partitioned:
        if cfg.deepspeed.stage == 3:
            partitioned.enter_context(transformers_zero3(ds_config))
            partitioned.enter_context(deepspeed.zero.Init(config_dict_or_path=ds_config))
        module = TrainModule(cfg.model, cfg.data.sizing, cfg.loss)
    # LoRA adapters made outside zero.Init stay whole here; deepspeed.initialize partitions them.
    module.model.add_adapters()
    module.fixed_frozen = frozenset(name for name, param in module.named_parameters() if not param.requires_grad)
    return module


def build_engine(cfg: RunConfig, freezable: list[str] = (), frozen: list[str] = (), load_universal: bool = False):
    """Build the module (`build_module`), freeze the modules `frozen`, and wrap the rest (AdamW groups over the
    prefixes `freezable`) in a DeepSpeed engine."""
    ds_config = deepspeed_config(cfg, load_universal)
    module = build_module(cfg, ds_config)
    mark_zero3_leaf_modules(module)
    set_trainable(module, trainable_names(module, module.fixed_frozen, frozen))
    return _initialize(module, cfg, freezable, ds_config)


def rebuild_engine(engine, cfg: RunConfig, freezable: list[str], frozen: list[str]):
    """A new engine on the same module with the modules `frozen` frozen; continuing param groups keep their fp32
    masters and AdamW state bitwise, newly trainable ones start fresh (`freezing.py`)."""
    module = engine.module
    carry = capture_optimizer_state(engine)
    release_engine(engine)
    set_trainable(module, trainable_names(module, module.fixed_frozen, frozen))
    new = _initialize(module, cfg, freezable, deepspeed_config(cfg))
    carry_optimizer_state(carry, new)
    return new


def _initialize(module: TrainModule, cfg: RunConfig, freezable: list[str], ds_config: dict):
    """The AdamW groups of the module's trainable parameters and the DeepSpeed engine around both."""
    import deepspeed

    optimizer = build_optimizer(module, cfg.optim, freezable)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    return engine
