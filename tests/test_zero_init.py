"""ZeRO-3 `zero.Init` (2 ranks, CPU, gloo, real DeepSpeed): every parameter is created partitioned, for an LLM
built from a config and for one loaded by `from_pretrained` from a local directory (MoME layers upcycled from its
MLP), and the gathered values are bitwise those of a plain build from the same seed at world size 1.

The test launches this file with torchrun; run as a script it is the worker.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from plait.trainer.engine import free_port

from test_train_distributed import tiny_config

CASES = ("config", "pretrained")
"""The LLM built from `model_kwargs`, and one loaded from a saved directory."""


def _save_llama(out: Path) -> Path:
    """A tiny random Llama (tied embeddings, unlike the config case) in `save_pretrained` format."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    config = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def _write_configs(tmp: Path, llm_dir: Path) -> None:
    """One run config per case, at ZeRO-3."""
    for case in CASES:
        data = tiny_config()
        data["deepspeed"] = {"zero_stage": 3}
        if case == "pretrained":
            # `model_kwargs` (ignored with a path) still give the batch's vocabulary; mome_layers is [1].
            data["model"]["llm"]["name_or_path"] = str(llm_dir)
        (tmp / f"{case}.yaml").write_text(yaml.safe_dump(data))


def _reference(config: Path):
    """The same module built without zero.Init (ZeRO-2 config, one process): its state dict and groups."""
    from plait.trainer.config import load_config
    from plait.trainer.engine import build_module, deepspeed_config

    cfg = load_config(config, ["deepspeed.zero_stage=2"])
    module = build_module(cfg, deepspeed_config(cfg))
    assert not any(hasattr(p, "ds_id") for p in module.parameters())
    return module.state_dict(), _groups(module, cfg)


def _groups(module, cfg) -> list[list]:
    """(name, elements) of each AdamW group: the decay split must not depend on partitioning."""
    from plait.trainer.optim import param_groups

    return [[g["name"], sum(int(getattr(p, "ds_numel", p.numel())) for p in g["params"])]
            for g in param_groups(module, cfg.optim)]


def _assert_same_state(gathered: dict, reference: dict) -> None:
    assert gathered.keys() == reference.keys()
    for key, value in reference.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == gathered[key].dtype and torch.equal(value, gathered[key]), key
        else:
            assert value == gathered[key], key


@pytest.mark.distributed
def test_zero_init_partitions_every_parameter_with_plain_build_values(tmp_path: Path):
    llm_dir = _save_llama(tmp_path / "llm")
    _write_configs(tmp_path, llm_dir)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in reports] == [2, 2]
    from safetensors.torch import load_file

    checkpoint = load_file(str(llm_dir / "model.safetensors"))
    for case in CASES:
        state, groups = _reference(tmp_path / f"{case}.yaml")
        for rank, report in enumerate(reports):
            built = report[case]
            # Right after construction: nothing is materialised, each rank holds a slice of every parameter.
            assert built["parameters"] > 0 and built["not_partitioned"] == [], (case, rank)
            assert built["local_elements"] < built["elements"]
            assert built["groups"] == groups
            _assert_same_state(torch.load(tmp_path / f"{case}-rank{rank}.pt"), state)
        # Each element lives on exactly one rank (up to DeepSpeed's alignment padding).
        assert sum(r[case]["local_elements"] for r in reports) >= reports[0][case]["elements"]
    # The pretrained weights are the checkpoint's; the MoME experts start as copies of its layer-1 MLP.
    llm = {k.removeprefix("model.llm.model."): v for k, v in state.items() if k.startswith("model.llm.model.")}
    mlp = "model.layers.1.mlp."
    for key, value in checkpoint.items():
        if not key.startswith(mlp):
            assert torch.equal(llm[key], value), key
    gate_up = torch.cat([checkpoint[mlp + "gate_proj.weight"], checkpoint[mlp + "up_proj.weight"]])
    assert all(torch.equal(w, gate_up) for w in llm[mlp + "w_in"])
    assert all(torch.equal(w, checkpoint[mlp + "down_proj.weight"]) for w in llm[mlp + "w_out"])
    # The partitioned module trains: one engine step on both ranks.
    assert all(math.isfinite(r["loss"]) for r in reports)


def _partition_report(module, cfg) -> dict:
    """How the freshly built module's parameters are held on this rank."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    params = dict(module.named_parameters())
    not_partitioned = [n for n, p in params.items()
                       if not (hasattr(p, "ds_id") and p.ds_status == ZeroParamStatus.NOT_AVAILABLE
                               and p.numel() == 0 and p.ds_numel > 0)]
    return {"parameters": len(params), "not_partitioned": not_partitioned,
            "elements": sum(p.ds_numel for p in params.values()),
            "local_elements": sum(p.ds_tensor.numel() for p in params.values()), "groups": _groups(module, cfg)}


def _train_step(cfg) -> float:
    """Build the engine (zero.Init inside) and run one optimizer step on a small mixed batch."""
    import torch.distributed as dist

    from plait.trainer.bench.model import make_batch
    from plait.trainer.engine import build_engine

    engine = build_engine(cfg)
    batch = make_batch([(0, (1, 2, 2), 3), (1, (1, 2, 4), 2)], cfg.model, cfg.data.sizing, seed=dist.get_rank())
    out = engine(batch, step=0)
    engine.backward(out.loss)
    engine.step()
    return float(out.loss)


def _worker(out: Path) -> None:
    """Each rank: build both cases under ZeRO-3, report the partitioning, save the gathered state, train a step."""
    import deepspeed
    import torch.distributed as dist

    from plait.trainer.config import load_config
    from plait.trainer.engine import build_module, deepspeed_config, init_distributed

    init_distributed()
    rank = dist.get_rank()
    report = {"world_size": dist.get_world_size()}
    for case in CASES:
        cfg = load_config(out / f"{case}.yaml")
        module = build_module(cfg, deepspeed_config(cfg))
        report[case] = _partition_report(module, cfg)
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            torch.save({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in module.state_dict().items()},
                       out / f"{case}-rank{rank}.pt")
    report["loss"] = _train_step(cfg)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    deepspeed.comm.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
