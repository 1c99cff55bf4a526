"""`plait bench zero_init`: peak resident memory per rank while building the ZeRO-3 engine (`zero.Init`) of a
~300M-parameter model at world size 2 over world size 1 (goal <= 0.6).

The model is the plait encoder + resampler + a Hugging Face Llama that `from_pretrained` loads from a local
directory the bench saves first (random weights, fp32), with one upcycled MoME layer in each tower. Each run is a
torchrun job (gloo, CPU, one thread per rank) whose ranks build the engine with `build_engine` and report the
high-water mark of their resident set (VmHWM) during the build, reset just before it, and their resident set
before it (imports and process group). `peak_ratio` compares whole-process peaks; `build_ratio` compares what the
build added on top of that baseline, which is what partitioning can shrink.

Two settings keep per-rank constants from hiding the scaling, and both are options: the negative queues are
replicated buffers by design (every rank reads every negative; 3 pairs x 2 x size x embed_dim fp32, 0.4 GB at the
training default of 65536), so the bench uses small ones; and the ranks run with a fixed glibc mmap threshold.
Under glibc's dynamic threshold the full per-module tensors zero.Init creates and frees (1-32 MB each) come from
the heap, interleaved with the partitions that stay, and the fragmented heap keeps them resident (~0.7 GB here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from plait.trainer.engine import free_port

GIB = 2**30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench options (the defaults give ~290M parameters)."""
    parser.add_argument("--llm-hidden", type=int, default=1024, help="Llama hidden size")
    parser.add_argument("--llm-layers", type=int, default=16, help="Llama decoder layers")
    parser.add_argument("--vocab", type=int, default=16000, help="Llama vocabulary (untied input and output tables)")
    parser.add_argument("--encoder-dim", type=int, default=512, help="encoder and resampler width")
    parser.add_argument("--queue-size", type=int, default=4096, help="negative queue entries per modality pair")
    parser.add_argument("--mmap-threshold", type=int, default=2**20,
                        help="MALLOC_MMAP_THRESHOLD_ of the ranks in bytes (0: glibc's dynamic default)")
    parser.add_argument("--work", default="", help="folder for the saved LLM and the reports (default: a temp dir)")


def _llama_kwargs(args: argparse.Namespace) -> dict:
    """The Llama's config kwargs."""
    hidden = args.llm_hidden
    return {"vocab_size": args.vocab, "hidden_size": hidden, "intermediate_size": hidden * 11 // 4,
            "num_hidden_layers": args.llm_layers, "num_attention_heads": hidden // 64,
            "num_key_value_heads": hidden // 64, "max_position_embeddings": 2048, "tie_word_embeddings": False}


def save_llm(args: argparse.Namespace, out: Path) -> Path:
    """A random Llama of the bench's size in `save_pretrained` format (built in a child, which frees it all)."""
    code = ("import json, sys, torch\nfrom transformers import LlamaConfig, LlamaForCausalLM\n"
            "torch.manual_seed(0)\n"
            "LlamaForCausalLM(LlamaConfig(**json.loads(sys.argv[1]))).save_pretrained(sys.argv[2])\n")
    subprocess.run([sys.executable, "-c", code, json.dumps(_llama_kwargs(args)), str(out)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())})
    return out


def write_config(args: argparse.Namespace, llm_dir: Path, path: Path) -> Path:
    """The run config: ZeRO-3, the pretrained LLM, an encoder and resampler of `--encoder-dim`."""
    dim = args.encoder_dim
    ffn = dim * 11 // 4
    model = {
        "encoder": {"dim": dim, "depth": 4, "num_heads": dim // 64, "ffn_hidden": ffn, "mome_layers": [3]},
        "resampler": {"dim": dim, "depth": 2, "num_heads": dim // 64, "ffn_hidden": ffn, "num_latents": 64},
        "llm": {"name_or_path": str(llm_dir), "mome_layers": [1]},
        "embed_dim": 256,
    }
    loss = {"queue": {"size": args.queue_size}}
    path.write_text(yaml.safe_dump({"seed": 0, "model": model, "loss": loss, "deepspeed": {"zero_stage": 3}}))
    return path


def launch(config: Path, out: Path, world: int, mmap_threshold: int) -> list[dict]:
    """One torchrun job of `world` ranks building the engine; their reports."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", __name__, str(config), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"world size {world} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return [json.loads((out / f"world{world}-rank{r}.json").read_text()) for r in range(world)]


def run(args: argparse.Namespace) -> dict:
    """Save the LLM, build at world size 1 then 2, and compare each run's worst rank."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        config = write_config(args, save_llm(args, work / "llm"), work / "run.yaml")
        one, two = (launch(config, work, world, args.mmap_threshold) for world in (1, 2))
    peak = {w: max(r["peak_bytes"] for r in reports) for w, reports in ((1, one), (2, two))}
    added = {w: max(r["peak_bytes"] - r["baseline_bytes"] for r in reports) for w, reports in ((1, one), (2, two))}
    return {
        "peak_ratio": peak[2] / peak[1],
        "build_ratio": added[2] / added[1],
        "params_m": one[0]["params"] / 1e6,
        "world1_peak_gib": peak[1] / GIB,
        "world2_peak_gib": [r["peak_bytes"] / GIB for r in two],
        "world1_baseline_gib": one[0]["baseline_bytes"] / GIB,
        "world2_baseline_gib": [r["baseline_bytes"] / GIB for r in two],
        "world1_build_s": one[0]["build_s"],
        "world2_build_s": max(r["build_s"] for r in two),
        "queue_size": args.queue_size,
        "mmap_threshold": args.mmap_threshold,
        "goal": 0.6,
    }


def _status_bytes(field: str) -> int:
    """A `kB` line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    """Restart the resident high-water mark (VmHWM) from the current resident set (Linux clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _worker(config: Path, out: Path) -> None:
    """One rank: join the group, build the engine, report its memory high-water mark during the build."""
    import deepspeed
    import torch.distributed as dist

    from plait.trainer.config import load_config
    from plait.trainer.engine import build_engine, init_distributed

    init_distributed()
    cfg = load_config(config)
    dist.barrier()
    _reset_peak()
    baseline = _status_bytes("VmRSS")
    start = time.perf_counter()
    engine = build_engine(cfg)
    seconds = time.perf_counter() - start
    report = {"baseline_bytes": baseline, "peak_bytes": _status_bytes("VmHWM"), "build_s": seconds,
              "params": sum(int(p.ds_numel) for p in engine.module.parameters())}
    world, rank = dist.get_world_size(), dist.get_rank()
    (out / f"world{world}-rank{rank}.json").write_text(json.dumps(report))
    deepspeed.comm.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
