"""Two-process DeepSpeed ZeRO-3 (CPU, gloo, fp32): ranks routing to disjoint experts and a rank with an empty
micro-batch both train without hanging.

The test launches this file with torchrun; run as a script it is the worker.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HIGH = 20.0
"""Router bias that decides routing outright (router weights are zeroed)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_zero3_disjoint_experts_and_empty_micro_batch(tmp_path: Path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in reports] == [2, 2] and [r["rank"] for r in reports] == [0, 1]
    for report in reports:
        assert len(report["losses"]) == 4 and all(math.isfinite(x) for x in report["losses"])
    # Disjoint phase: the encoder MoME layer sees only images on rank 0 and only audio on rank 1.
    assert set(reports[0]["encoder_experts"]) == {0, 1} and set(reports[1]["encoder_experts"]) == {2, 3}
    # LLM: rank 0 (image latents + text) never uses the audio experts rank 1 uses for its latents.
    assert set(reports[0]["llm_experts"]) == {0, 1} and set(reports[1]["llm_experts"]) == {0, 1, 2, 3}
    # Empty phase: rank 1 had no samples and still stepped; parameters stayed identical across ranks.
    assert reports[1]["empty_samples"] == 0 and reports[0]["empty_samples"] > 0
    assert reports[0]["checksum"] == reports[1]["checksum"]


def _model_config():
    from plait.trainer.model.config import EncoderConfig, LLMConfig, ModelConfig, MoMEConfig, ResamplerConfig

    llama = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}
    return ModelConfig(
        encoder=EncoderConfig(dim=32, depth=2, num_heads=4, ffn_hidden=48, mome_layers=[1]),
        resampler=ResamplerConfig(dim=32, depth=1, num_latents=4, num_heads=4, ffn_hidden=48),
        llm=LLMConfig(model_kwargs=llama, mome_layers=[1]),
        mome=MoMEConfig(num_experts=4, top_k=2, router_bias=True),
        embed_dim=16,
    )


def _force_routing(model) -> None:
    """Text and images -> experts {0, 1}; audio and video -> {2, 3} (zero router weights, decisive bias)."""
    import torch

    from plait.trainer.model.mome import MoMELayer

    bias = torch.tensor([[HIGH, HIGH, -HIGH, -HIGH], [HIGH, HIGH, -HIGH, -HIGH],
                         [-HIGH, -HIGH, HIGH, HIGH], [-HIGH, -HIGH, HIGH, HIGH]])
    for layer in model.modules():
        if isinstance(layer, MoMELayer):
            torch.nn.init.zeros_(layer.router.proj.weight)
            layer.router.bias.data.copy_(bias)


def _loss(out):
    import torch

    ce = torch.nn.functional.cross_entropy(out.caption_logits, out.caption_targets, reduction="sum")
    z = sum(r.logits.logsumexp(-1).pow(2).sum() for r in out.router_outputs)
    return ce + (out.media_embeds * out.text_embeds).sum() + 1e-4 * z


def _worker(out_dir: Path) -> None:
    """Each rank: 2 steps with disjoint routing, then 2 steps where rank 1's micro-batch is empty."""
    import deepspeed
    import torch

    from plait.data.sizing import SizingConfig
    from plait.trainer.bench.model import make_batch
    from plait.trainer.model.mome import mark_zero3_leaf_modules
    from plait.trainer.model.multimodal import MultimodalModel

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)
    cfg = _model_config()
    sizing = SizingConfig(patch_size=4, audio_patch=4)
    model = MultimodalModel(cfg, sizing)
    _force_routing(model)
    mark_zero3_leaf_modules(model)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    modality = 0 if rank == 0 else 1
    disjoint = [make_batch([(modality, (1, 2, 3), 3), (modality, (1, 3, 3), 2)], cfg, sizing,
                           seed=rank + 10 * step)
                for step in range(2)]
    full = make_batch([(0, (1, 2, 2), 3), (2, (2, 2, 2), 4), (1, (1, 2, 4), 2)], cfg, sizing, seed=7)
    empty = make_batch([], cfg, sizing, seed=0)
    losses, encoder_experts, llm_experts = [], set(), set()
    for step, batch in enumerate(disjoint + [empty if rank == 1 else full] * 2):
        out = engine(batch)
        loss = _loss(out)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
        if step < len(disjoint):
            encoder_experts |= set(out.router_outputs[0].topk_experts.flatten().tolist())
            llm_experts |= set(out.router_outputs[1].topk_experts.flatten().tolist())
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        checksum = float(sum(p.double().sum() for p in engine.module.parameters()))
    report = {"rank": rank, "world_size": world, "losses": losses, "encoder_experts": sorted(encoder_experts),
              "llm_experts": sorted(llm_experts), "empty_samples": (empty if rank == 1 else full).num_samples,
              "checksum": checksum}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    deepspeed.comm.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
