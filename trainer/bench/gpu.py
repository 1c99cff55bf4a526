"""`plait bench gpu`: check every fast path against its reference on this device, then time them and MFU.

One prepared run (budget `--budget-s`, default 7 minutes; each section also has its own alarm):
1. checks: varlen attention (flash-attn / torch varlen / bucketed SDPA) vs the float64 loop; MoE
   permute/combine (torch and Triton) vs the plain loop; chunked InfoNCE (torch and Triton) vs the
   materialised logits; fused norms and AdamW vs formulas. Values and gradients.
2. timings: varlen attention (flash-attn or torch varlen vs bucketed SDPA), MoE dispatch vs a dense FFN
   doing the same k x T rows, InfoNCE (Triton) vs materialised (time and peak memory), and a full
   training step (forward, losses, backward, fused AdamW) of a ~1B-parameter packed bf16 model (the one of
   configs/examples/vlm-1b-1node.yaml) with MFU = estimated model FLOPs / step time / the device's peak bf16
   FLOPs (`--peak-tflops`, else `step_metrics.PEAK_TFLOPS`).
Without CUDA every GPU-only part is reported as skipped; `--cpu-timings --small` runs the timings on
CPU at toy sizes (the tests do); `--checks-only` stops after the checks (`make gpu-check` runs it so).
A table is printed last, then the JSON line.
Example (GPU): `plait bench gpu`; (CPU smoke test): `plait bench gpu --small --cpu-timings`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.table import Table

from plait.data.sizing import SizingConfig
from plait.ops.attention import flash_attn_available, torch_varlen_available, varlen_attention
from plait.ops.fused import make_adamw, make_norm, triton_available
from plait.ops.infonce import MatchIds, infonce_chunked, infonce_reference
from plait.ops.moe import combine, dispatch, ffn_rows, grouped_ffn, permute, reference_moe
from plait.ops.segments import lengths_to_cu
from plait.trainer.bench.model import make_batch, navit_mix
from plait.trainer.config_loader import build, read_yaml
from plait.trainer.console import console
from plait.trainer.model.accounting import estimate_flops, parameter_counts
from plait.trainer.model.config import ModelConfig
from plait.trainer.model.multimodal import MultimodalModel
from plait.trainer.step_metrics import device_peak_flops

logger = logging.getLogger(__name__)

BILLION_EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "examples" / "vlm-1b-1node.yaml"
"""The run config whose model section is the ~1B model timed here (and trained by `make gpu-check`)."""

NO_CUDA = "skipped: needs CUDA"


class SectionTimeout(Exception):
    """A section ran past its alarm."""


@contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in this (main) thread after `seconds`."""

    def _raise(signum, frame):
        raise SectionTimeout(f"timed out after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest reference magnitude (at least 1), in float64."""
    if not got.numel():
        return 0.0
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1.0))


def _grads_error(outputs: list[tuple[torch.Tensor, ...]]) -> float:
    """Largest difference between corresponding tensors of two (values, grads...) tuples."""
    return max(max_error(a, b) for a, b in zip(*outputs))


def _leaves(device: torch.device, dtype: torch.dtype, *shapes: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    """Random leaf tensors that require grad."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in shapes]


def _varlen_case(tokens: int, heads: int, dim: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Packed q, k, v and NaViT-like segment offsets."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, tokens // 64), max(2, tokens // 8), (64,), generator=g)
    lengths = lengths[: int((lengths.cumsum(0) <= tokens).sum())]
    cu = lengths_to_cu(lengths).to(device, torch.int32)
    total = int(cu[-1])
    return (*_leaves(device, dtype, (total, heads, dim), (total, heads, dim), (total, heads, dim), seed=seed), cu)


def check_attention(path: str, device: torch.device, small: bool) -> tuple[str, str]:
    """One varlen path vs the float64 loop, causal and not, values and gradients."""
    cuda_only = path in ("flash", "torch_varlen")
    if cuda_only and device.type != "cuda":
        return NO_CUDA, ""
    if path == "flash" and not flash_attn_available() or path == "torch_varlen" and not torch_varlen_available():
        return "skipped: not installed", ""
    dtype = torch.bfloat16 if cuda_only else torch.float32
    q, k, v, cu = _varlen_case(256 if small else 2048, 4, 64, device, dtype)
    worst = 0.0
    for causal in (False, True):
        outputs = []
        for backend in (path, "reference"):
            out = varlen_attention(q, k, v, cu, causal=causal, backend=backend)
            outputs.append((out, *torch.autograd.grad(out.float().square().sum(), (q, k, v))))
        worst = max(worst, _grads_error(outputs))
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-3
    return ("passed" if worst <= tol else "failed"), f"max err {worst:.2e} (tol {tol:.0e}, {dtype})"


def _moe_run(backend: str, x: torch.Tensor, logits: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor):
    """Route top-2, dispatch, grouped SwiGLU experts, combine; returns output and gradients."""
    weights, chosen = logits.float().softmax(-1).topk(2)
    plan = dispatch(chosen, weights.to(x.dtype), w_in.shape[0], None)
    if backend == "reference":
        out = reference_moe(x, chosen, weights.to(x.dtype),
                            lambda e, rows: ffn_rows(rows, w_in[e], w_out[e], F.silu, True))
    else:
        out = combine(grouped_ffn(permute(x, plan, backend), plan.counts, w_in, w_out, F.silu, True), plan,
                      x.shape[0], backend)
    return (out, *torch.autograd.grad(out.square().sum(), (x, logits, w_in, w_out)))


def check_moe(backend: str, device: torch.device) -> tuple[str, str]:
    """MoE permute/combine (`torch` or `triton`) vs the per-token loop, float32."""
    if backend == "triton" and device.type != "cuda":
        return f"{NO_CUDA} (tests run it under TRITON_INTERPRET=1)", ""
    if backend == "triton" and not triton_available():
        return "skipped: triton not installed", ""
    inputs = _leaves(device, torch.float32, (48, 32), (48, 4), (4, 64, 32), (4, 32, 32), seed=1)
    worst = _grads_error([_moe_run(backend, *inputs), _moe_run("reference", *inputs)])
    return ("passed" if worst <= 1e-3 else "failed"), f"max err {worst:.2e}"


def _infonce_case(batch: int, queue: int, dim: int, device: torch.device, dtype: torch.dtype):
    """Normalised queries/keys/queue with one id field (a few queue entries duplicate batch keys)."""
    q, k, qu = (F.normalize(t.detach(), dim=-1).requires_grad_()
                for t in _leaves(device, dtype, (batch, dim), (batch, dim), (queue, dim), seed=2))
    ids = torch.arange(batch, device=device)[:, None]
    queue_ids = torch.arange(batch, batch + queue, device=device)[:, None]
    queue_ids[: batch // 4] = ids[: batch // 4]
    scale = torch.tensor(1 / 0.07, device=device, dtype=dtype, requires_grad=True)
    return q, k, qu, scale, torch.arange(batch, device=device), MatchIds(ids, ids, queue_ids), MatchIds.none(
        batch, batch, queue, device)


def check_infonce(backend: str, device: torch.device) -> tuple[str, str]:
    """Chunked InfoNCE (`torch` or `triton`) vs the materialised logits, float32, values and gradients."""
    if backend == "triton" and device.type != "cuda":
        return f"{NO_CUDA} (tests run it under TRITON_INTERPRET=1)", ""
    if backend == "triton" and not triton_available():
        return "skipped: triton not installed", ""
    case = _infonce_case(40, 300, 48, device, torch.float32)
    outputs = []
    for fn in (lambda: infonce_chunked(*case, label_smoothing=0.1, chunk_size=64, backend=backend),
               lambda: infonce_reference(*case, label_smoothing=0.1)):
        loss, stats = fn()
        outputs.append((loss, stats, *torch.autograd.grad(loss.sum(), case[:4])))
    worst = _grads_error(outputs)
    return ("passed" if worst <= 1e-3 else "failed"), f"max err {worst:.2e}"


def check_fused(device: torch.device) -> tuple[str, str]:
    """The chosen RMSNorm and AdamW vs torch's plain ones (one step), float32."""
    norm = make_norm("rmsnorm", 64, eps=1e-6, device=device)
    x = torch.randn(8, 64, device=device)
    want = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)
    worst = max_error(norm(x), want)
    params = [torch.nn.Parameter(torch.ones(64, device=device)) for _ in range(2)]
    opts = [make_adamw([params[0]], lr=0.1), torch.optim.AdamW([params[1]], lr=0.1, foreach=False)]
    for p, opt in zip(params, opts):
        p.grad = torch.linspace(-1, 1, 64, device=device)
        opt.step()
    worst = max(worst, max_error(*params))
    detail = f"{type(norm).__name__} + {type(opts[0]).__name__}; max err {worst:.2e}"
    return ("passed" if worst <= 1e-5 else "failed"), detail


def _sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall time measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(step: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of `step` after one warm-up."""
    step()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def time_attention(device: torch.device, dtype: torch.dtype, small: bool, repeats: int) -> dict:
    """Varlen fwd+bwd: the fastest path available vs bucketed SDPA."""
    q, k, v, cu = _varlen_case(1024 if small else 32768, 4 if small else 16, 64 if small else 128, device, dtype)
    fast = "bucketed"
    if device.type == "cuda" and flash_attn_available():
        fast = "flash"
    elif device.type == "cuda" and torch_varlen_available():
        fast = "torch_varlen"

    def step(backend: str) -> Callable[[], object]:
        return lambda: varlen_attention(q, k, v, cu, causal=True, backend=backend).sum().backward()

    fast_s, sdpa_s = seconds(step(fast), device, repeats), seconds(step("bucketed"), device, repeats)
    return {"attention_path": fast, "attention_fast_ms": 1e3 * fast_s, "attention_sdpa_ms": 1e3 * sdpa_s,
            "attention_sdpa_over_fast": sdpa_s / fast_s}


def time_moe(device: torch.device, dtype: torch.dtype, small: bool, repeats: int) -> dict:
    """MoE dispatch (route, permute, grouped experts, combine) vs one dense FFN over the same k x T rows."""
    tokens, dim, hidden, experts = (512, 64, 128, 4) if small else (16384, 2048, 5504, 8)
    x, logits, w_in, w_out = _leaves(device, dtype, (tokens, dim), (tokens, experts), (experts, 2 * hidden, dim),
                                     (experts, dim, hidden), seed=3)
    with torch.no_grad():
        w_in.mul_(dim**-0.5)
        w_out.mul_(hidden**-0.5)
    rows = x.detach().repeat(2, 1).requires_grad_()

    def moe(backend: str) -> Callable[[], object]:
        def step() -> None:
            weights, chosen = logits.float().softmax(-1).topk(2)
            plan = dispatch(chosen, weights.to(dtype), experts, None)
            grouped = grouped_ffn(permute(x, plan, backend), plan.counts, w_in, w_out, F.silu, True)
            combine(grouped, plan, tokens, backend).sum().backward()
        return step

    dense_s = seconds(lambda: ffn_rows(rows, w_in[0], w_out[0], F.silu, True).sum().backward(), device, repeats)
    torch_s = seconds(moe("torch"), device, repeats)
    out = {"moe_torch_ms": 1e3 * torch_s, "moe_dense_ms": 1e3 * dense_s, "moe_torch_over_dense": torch_s / dense_s}
    if device.type == "cuda" and triton_available():
        triton_s = seconds(moe("triton"), device, repeats)
        out.update(moe_triton_ms=1e3 * triton_s, moe_triton_over_dense=triton_s / dense_s,
                   moe_torch_over_triton=torch_s / triton_s)
    return out


def time_infonce(device: torch.device, small: bool, repeats: int) -> dict:
    """InfoNCE fwd+bwd against a queue: chunked (Triton on CUDA) vs materialised logits; time and peak memory."""
    case = _infonce_case(64 if small else 1024, 2048 if small else 262144, 64 if small else 256, device,
                         torch.float32)

    def step(fn: Callable) -> Callable[[], object]:
        return lambda: fn(*case)[0].mean().backward()

    out = {}
    for name, fn in (("chunked", infonce_chunked), ("materialised", infonce_reference)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        out[f"infonce_{name}_ms"] = 1e3 * seconds(step(fn), device, repeats)
        if device.type == "cuda":
            out[f"infonce_{name}_peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    out["infonce_materialised_over_chunked"] = out["infonce_materialised_ms"] / out["infonce_chunked_ms"]
    return out


def billion_config() -> ModelConfig:
    """~1.2B parameters (1.1B active per token): the model of `configs/examples/vlm-1b-1node.yaml` (a 2048-wide
    16-layer Llama, a 1024-wide encoder and resampler), on whichever attention path this machine has fastest."""
    model = build(ModelConfig, read_yaml(BILLION_EXAMPLE).get("model"), str(BILLION_EXAMPLE), "model")
    return dataclasses.replace(model, attention_backend="auto")


def time_train_step(device: torch.device, small: bool, samples: int, repeats: int,
                    peak_tflops: float | None = None) -> dict:
    """Forward + caption CE + InfoNCE against a queue + backward + AdamW step; MFU where the peak is known."""
    cfg = ModelConfig() if small else billion_config()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = MultimodalModel(cfg, SizingConfig()).to(dtype)
    optimizer = make_adamw(model.parameters(), lr=1e-5)
    batch = make_batch(navit_mix(samples, 0), cfg, SizingConfig()).to(device)
    queue = F.normalize(torch.randn(8192, cfg.embed_dim, device=device, dtype=dtype), dim=-1)
    ids = MatchIds.none(samples, samples, queue.shape[0], device)

    def step() -> None:
        out = model(batch)
        media, text = F.normalize(out.media_embeds, dim=-1), F.normalize(out.text_embeds, dim=-1)
        contrastive, _ = infonce_chunked(media, text, queue, torch.tensor(14.0, device=device),
                                         torch.arange(samples, device=device), ids, ids)
        loss = F.cross_entropy(out.caption_logits.float(), out.caption_targets) + contrastive.float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s = seconds(step, device, repeats)
    flops = estimate_flops(model, batch).train
    result = {"train_params": parameter_counts(model).total, "train_step_ms": 1e3 * step_s,
              "train_model_tflops_per_s": flops / step_s / 1e12, "train_tokens": batch.streams["vision"].num_tokens}
    peak = device_peak_flops(peak_tflops)
    result["mfu"] = flops / step_s / peak if peak else None
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench options."""
    parser.add_argument("--small", action="store_true", help="toy sizes (CPU smoke test)")
    parser.add_argument("--cpu-timings", action="store_true", help="run the timings on CPU when there is no CUDA")
    parser.add_argument("--samples", type=int, default=0, help="samples in the training micro-batch (0: 128, 8 small)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement (median kept)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip sections that would start past this")
    parser.add_argument("--section-timeout-s", type=float, default=150.0, help="alarm per section")
    parser.add_argument("--checks-only", action="store_true", help="check the fast paths, skip the timings")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU (default: the table of known accelerators)")


def _guarded(name: str, fn: Callable[[], tuple[str, str] | dict], args: argparse.Namespace, started: float):
    """Run one section under its alarm and the overall budget; failures become a status, not a crash."""
    left = args.budget_s - (time.perf_counter() - started)
    if left <= 0:
        return "skipped: time budget spent", ""
    try:
        with alarm(min(args.section_timeout_s, left)):
            return fn()
    except Exception as err:  # noqa: BLE001 - one broken section must not lose the others' results
        logger.exception("gpu bench: %s failed", name)
        return f"failed: {type(err).__name__}", str(err)[:200]
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> dict:
    """Checks then timings; prints the table last and returns one flat dict (statuses and figures)."""
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[tuple[str, str, str]] = []
    checks = [(f"attention.{p}", lambda p=p: check_attention(p, device, args.small))
              for p in ("flash", "torch_varlen", "bucketed")]
    checks += [(f"moe.{b}", lambda b=b: check_moe(b, device)) for b in ("torch", "triton")]
    checks += [(f"infonce.{b}", lambda b=b: check_infonce(b, device)) for b in ("torch", "triton")]
    checks.append(("fused", lambda: check_fused(device)))
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    for name, fn in checks:
        status, detail = _guarded(name, fn, args, started)
        result[f"check/{name}"] = status
        rows.append((f"check {name}", status, detail))
    timed = (device.type == "cuda" or args.cpu_timings) and not args.checks_only
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    samples = args.samples or (8 if args.small else 128)
    timings = [("attention", lambda: time_attention(device, dtype, args.small, args.repeats)),
               ("moe", lambda: time_moe(device, dtype, args.small, args.repeats)),
               ("infonce", lambda: time_infonce(device, args.small, args.repeats)),
               ("train_step", lambda: time_train_step(device, args.small, samples, max(2, args.repeats // 2),
                                                      args.peak_tflops))]
    untimed = "skipped: --checks-only" if args.checks_only else f"{NO_CUDA} (or --cpu-timings)"
    for name, fn in timings:
        out = _guarded(name, fn, args, started) if timed else (untimed, "")
        if isinstance(out, dict):
            result.update(out)
            result[f"time/{name}"] = "passed"
            rows.append((f"time {name}", "passed", ""))
            rows.extend((f"  {key}", "", _fmt(value)) for key, value in out.items())
        else:
            result[f"time/{name}"] = out[0]
            rows.append((f"time {name}", *out))
    result["wall_s"] = time.perf_counter() - started
    table = Table(title=f"plait bench gpu ({result['device']}, {result['wall_s']:.0f} s)")
    for column in ("part", "status", "detail"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    return result


def _fmt(value: object) -> str:
    """Compact number formatting for the table."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)
