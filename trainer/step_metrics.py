"""Per-step training metrics accumulated between log steps and reduced over ranks in one collective.

Losses and statistics are averaged over steps and ranks (each rank's loss is its share of the global
loss); token, sample, padding and drop counts are summed; router assignments become expert utilisation
per token modality. MFU divides model FLOPs per second by the device's peak where that peak is known
(`tracking.peak_tflops`, else the `PEAK_TFLOPS` table).
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from plait.data.batch import TOKEN_MODALITIES
from plait.trainer.losses.distributed import host_group

PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"A100", 312.0),
    (r"\bH100.*PCIe", 756.0),
    (r"\bH100.*NVL", 835.0),
    (r"\bH100", 989.0),
    (r"\bH800.*PCIe", 756.0),
    (r"\bH800", 989.0),
    (r"\bH200.*NVL", 835.0),
    (r"\bH200", 989.0),
    (r"\bGH200", 989.0),
    (r"\bB200", 2250.0),
    (r"L40S", 362.0),
    (r"\bL4\b", 121.0),
    (r"MI300X", 1307.0),
    (r"MI325X", 1307.0),
)
"""Dense (no 2:4 sparsity) bf16 tensor-core peak TFLOP/s, by a regex searched in `torch.cuda.get_device_name()`.

The first matching row wins, so a variant (`H100 PCIe`, `H100 NVL`) sits above its family's row, and
`\b` keeps `H200` from matching `GH200` and `B200` from matching `GB200`. Sources: the vendors' datasheets
at boost clock, halving the "with sparsity" figure where only that one is printed: A100 (SXM and PCIe) 312;
H100 SXM 989 (torch names it `NVIDIA H100 80GB HBM3`), H100 PCIe 756, H100 NVL 835; H800 like H100;
H200 SXM 989 (`NVIDIA H200`), H200 NVL 835; GH200 989; B200 2250 (HGX B200: 4.5 PFLOP/s sparse per GPU);
L40S 362; L4 121; AMD MI300X and MI325X 1307 (ROCm torch names it `AMD Instinct MI300X`). Sustained rates
are lower (a large bf16 matmul on an H100/H200 reaches about 800), so even a perfect run stays below MFU 1. A device
missing here (CPUs included) reports no MFU unless `tracking.peak_tflops` names its peak.
"""


def peak_tflops_of(device_name: str) -> float | None:
    """The table's dense bf16 peak TFLOP/s for a device name, or None when no row matches."""
    return next((peak for pattern, peak in PEAK_TFLOPS if re.search(pattern, device_name, re.IGNORECASE)), None)


def device_peak_flops(override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of this rank's device: `override_tflops` when set (any device), else the table's, else None."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    peak = peak_tflops_of(torch.cuda.get_device_name())
    return None if peak is None else peak * 1e12


class MetricWindow:
    """Sums of one rank's step metrics since the last log; `reduce` turns them into global metrics.

    Values may be host floats or device tensors: sums stay where they are, and `reduce` reads every device
    value back in one transfer, so only logging steps wait for the device.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        self.sums: dict[str, torch.Tensor | float] = {}
        self.seen: dict[str, int] = defaultdict(int)
        self.counts: dict[str, torch.Tensor | float] = {}
        self.experts: torch.Tensor | None = None
        self.started = time.perf_counter()

    def add_step(self, components: dict[str, torch.Tensor | float], counts: dict[str, torch.Tensor | float],
                 expert_counts: torch.Tensor | None) -> None:
        """One optimizer step's averaged components, summed counts and router assignments."""
        for key, value in components.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.seen[key] += 1
        for key, value in counts.items():
            self.counts[key] = self.counts.get(key, 0.0) + value
        if expert_counts is not None and expert_counts.numel():
            self.experts = expert_counts.clone() if self.experts is None else self.experts + expert_counts

    def reduce(self, peak_flops: float | None) -> tuple[dict[str, float], torch.Tensor | None]:
        """Global metrics of the window (call on every rank) and the summed expert assignments."""
        elapsed = time.perf_counter() - self.started
        sums, counts = host_values(self.sums), host_values(self.counts)
        experts = self.experts.cpu() if self.experts is not None else None
        local = {"sums": sums, "seen": dict(self.seen), "counts": counts, "experts": experts}
        parts = [local]
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local, group=host_group())
        world = len(parts)
        metrics: dict[str, float] = {}
        for key in {k for p in parts for k in p["sums"]}:
            metrics[key] = sum(p["sums"].get(key, 0.0) for p in parts) / sum(p["seen"].get(key, 0) for p in parts)
        counts = {k: sum(p["counts"].get(k, 0.0) for p in parts) for k in {k for p in parts for k in p["counts"]}}
        for key, value in counts.items():
            if key.startswith(("skipped/", "count/", "source/")):
                metrics[key] = value
        metrics.update(_throughput(counts, elapsed, world, peak_flops))
        experts = [p["experts"] for p in parts if p["experts"] is not None]
        total = torch.stack(experts).sum(0) if experts else None
        if total is not None:
            metrics.update(expert_utilisation(total))
        return metrics, total


def host_values(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Floats of a mix of host numbers and device scalars, reading all the device ones in one transfer."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    device = next((v.device for v in tensors.values() if v.device.type != "cpu"), torch.device("cpu"))
    read = torch.stack([v.detach().to(device, torch.float64) for v in tensors.values()]).tolist() if tensors else []
    out = {k: float(v) for k, v in values.items() if not isinstance(v, torch.Tensor)}
    out.update(zip(tensors, read))
    return out


def _throughput(counts: dict[str, float], elapsed: float, world: int, peak: float | None) -> dict[str, float]:
    """Tokens/s, samples/s, padding and dropped-token fractions, MFU."""
    tokens = counts.get("tokens", 0.0)
    out = {
        "throughput/tokens_per_s": tokens / max(elapsed, 1e-9),
        "throughput/samples_per_s": counts.get("samples", 0.0) / max(elapsed, 1e-9),
        "data/padding_fraction": counts.get("padding", 0.0) / max(tokens + counts.get("padding", 0.0), 1.0),
        "data/dropped_fraction": counts.get("dropped", 0.0) / max(tokens + counts.get("dropped", 0.0), 1.0),
    }
    if peak is not None:
        out["throughput/mfu"] = counts.get("flops", 0.0) / max(elapsed, 1e-9) / (peak * world)
    return out


def expert_utilisation(counts: torch.Tensor) -> dict[str, float]:
    """`experts/layer<l>/<modality>/e<e>`: share of each token modality's assignments per expert and layer."""
    share = counts.double() / counts.sum(-1, keepdim=True).clamp(min=1)
    out = {}
    for layer in range(share.shape[0]):
        for m, modality in enumerate(TOKEN_MODALITIES):
            if counts[layer, m].sum() > 0:
                out.update({f"experts/layer{layer}/{modality}/e{e}": float(share[layer, m, e])
                            for e in range(share.shape[2])})
    return out


def plot_expert_heatmap(counts: torch.Tensor, path: str | Path) -> None:
    """PNG heatmap: rows = (layer, token modality), columns = experts, colour = share of assignments."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = (counts.double() / counts.sum(-1, keepdim=True).clamp(min=1)).reshape(-1, counts.shape[-1])
    labels = [f"L{l} {m}" for l in range(counts.shape[0]) for m in TOKEN_MODALITIES]
    figure, axis = plt.subplots(figsize=(1 + 0.6 * counts.shape[-1], 0.4 * len(labels) + 1))
    image = axis.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    axis.set_yticks(range(len(labels)), labels, fontsize=7)
    axis.set_xticks(range(counts.shape[-1]), [f"e{e}" for e in range(counts.shape[-1])], fontsize=7)
    axis.set_title("expert utilisation per token modality", fontsize=9)
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def grad_norm_key(name: str) -> str:
    """The module a parameter's gradient norm is reported under: `encoder.vision`, `encoder.blocks`, `llm`, ..."""
    parts = name.removeprefix("model.").split(".")
    return ".".join(parts[:2]) if parts[0] == "encoder" else parts[0]


def grad_norms(module: torch.nn.Module, group_of) -> dict[str, float]:
    """L2 gradient norms per parameter group and per module (call on every rank, after backward, before step).

    `deepspeed.utils.safe_get_full_grad` assembles each full gradient from its ZeRO partitions.
    """
    from deepspeed.utils import safe_get_full_grad

    squares: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        grad = safe_get_full_grad(param)
        if grad is None:
            continue
        square = grad.detach().float().pow(2).sum()
        for key in (f"grad_norm/group/{group_of(name)}", f"grad_norm/module/{grad_norm_key(name)}"):
            squares[key] = squares[key] + square if key in squares else square
    return {key: float(value.sqrt()) for key, value in squares.items()}
