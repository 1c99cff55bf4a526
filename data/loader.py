"""The loader: planned micro-batches → read → decode → patchify → tokenize → PackedBatch, in workers.

The dataset is map-style over step indices: item i is the MicroBatchPlan of step i for this rank,
read (`plait.data.reader`), decoded at the grid the plan chose, and packed. The loader's sampler asks
for each plan in the main process (one plan per rank, whatever the worker count) and hands it to a
worker with its index; workers only execute plans and every random choice is keyed by the sample,
so the batches are identical for any number of workers. A bad sample is dropped from its batch and counted by
reason; the main process tracks runs of consecutive failures across steps (in step order) and stops the run
with the shard and key of the last one when a run gets too long.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PreTrainedTokenizerBase

from plait.data.batch import PackedBatch
from plait.data.checks import check_at_least, check_positive
from plait.data.decode_audio import SpecAugmentConfig
from plait.data.decode_errors import DECODE_REASONS, DecodeError
from plait.data.manifest import caption_and_group
from plait.data.media import modality_of
from plait.data.packing import PackingConfig, PatchedSample, pack_samples
from plait.data.plan_types import MicroBatchPlan, SampleRef
from plait.data.reader import READ_REASONS, fetch_samples
from plait.data.remote import ShardCache
from plait.data.preprocess import SampleDecoder
from plait.data.rng import key_id
from plait.data.sizing import SizingConfig
from plait.data.tar_scan import ScannedSample
from plait.data.tokenizer import encode_captions

logger = logging.getLogger(__name__)

SKIP_REASONS = READ_REASONS + tuple(r for r in DECODE_REASONS if r not in READ_REASONS)
"""Every reason a planned sample is skipped; each has a `skipped_<reason>` counter in every batch."""

Plans = Sequence[MicroBatchPlan] | Callable[[int], MicroBatchPlan]
"""Where step i's MicroBatchPlan comes from: a list, or a function of the step called in step order in the main
process (e.g. the sample plan)."""
Item = int | tuple[int, MicroBatchPlan]
"""A dataset item: a step index, or a step index with its plan already made (what the loader's sampler sends)."""


@dataclass(kw_only=True)
class LoaderConfig:
    """Decode-time choices and DataLoader tuning (worker count and failure limit live in the data config)."""

    prefetch_factor: int = 2
    """Micro-batches each worker prepares ahead."""
    max_caption_tokens: int = 77
    """Longest caption in tokens, EOS included (longer ones are truncated before the EOS)."""
    spec_augment: bool = True
    """Apply SpecAugment masks to audio in training (held-out batches never get them)."""
    spec: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)
    """SpecAugment mask counts and widths."""
    max_sample_bytes: int = 1 << 30
    """Samples larger than this in the shard (all members) are skipped as oversized without being read; 0 = no limit."""
    log_interval_s: float = 30.0
    """Skipped-sample warnings are logged at most once per this many seconds (with counts since the last)."""
    shard_cache: str = ""
    """Folder of local copies of `pipe:` shards and of URL shards whose server ignores range requests (read once,
    sequentially, then locally); empty = `plait-shard-cache-<uid>` in the system temporary folder."""
    shard_cache_gb: float = 8.0
    """Size the local shard copies are kept within per node (least recently used removed first)."""

    def __post_init__(self) -> None:
        check_at_least(self, 1, "prefetch_factor", "max_caption_tokens")
        check_positive(self, "log_interval_s", "shard_cache_gb")
        check_at_least(self, 0, "max_sample_bytes")

    def cache(self) -> ShardCache:
        """The local copies of streamed shards these settings describe."""
        return ShardCache(self.shard_cache, int(self.shard_cache_gb * (1 << 30)))


@dataclass
class Skip:
    """A planned sample that was left out of its batch."""

    position: int
    """Its index in the plan's `samples`."""
    shard: str
    """Shard it was read from."""
    key: str
    """Its key."""
    reason: str
    """One of SKIP_REASONS."""
    detail: str = ""
    """What went wrong, for logs."""


@dataclass
class LoadedStep:
    """One decoded micro-batch and what was left out of it (what a worker hands back)."""

    step: int
    """Step index the plan was asked for."""
    batch: PackedBatch
    """The packed batch of the samples that decoded."""
    planned: int
    """Samples the plan asked for."""
    skips: list[Skip]
    """Samples left out, in plan order."""

    def pin_memory(self) -> LoadedStep:
        """The step with its batch in page-locked memory (DataLoader `pin_memory=True`, CUDA runs)."""
        return LoadedStep(self.step, self.batch.pin_memory(), self.planned, self.skips)


class TooManyFailures(RuntimeError):
    """Raised after `max_consecutive_failures` bad samples in a row; names the last one."""


def group_id(group: str) -> int:
    """The `PackedBatch.group` id of a manifest group string (`rng.key_id`: equal strings, equal ids)."""
    return key_id(group)


def media_member(sample: ScannedSample, modality: str) -> tuple[str, bytes]:
    """(extension, bytes) of the sample's media member of `modality` (`seg.jpg` is typed by its last part)."""
    for ext, member in sample.members.items():
        kind = ext.rsplit(".", 1)[-1].lower()
        if modality_of(kind) == modality and member.data is not None:
            return kind, member.data
    raise DecodeError("empty", f"no {modality} member among {sorted(sample.members)}")


class PlanDataset(Dataset):
    """Map-style dataset over steps: item i is the packed micro-batch of `plans` at step i.

    `augment` applies each sample's keyed augmentation (frame jitter, SpecAugment); held-out batches turn it
    off for the centred frames and unmasked audio that inference sees."""

    def __init__(self, plans: Plans, tokenizer: PreTrainedTokenizerBase, sizing: SizingConfig,
                 packing: PackingConfig, cfg: LoaderConfig | None = None, num_steps: int | None = None,
                 augment: bool = True) -> None:
        if num_steps is None and not isinstance(plans, Sequence):
            raise ValueError("num_steps: required when plans is a function of the step")
        self.plans = plans
        self.num_steps = len(plans) if num_steps is None else num_steps  # type: ignore[arg-type]
        self.tokenizer = tokenizer
        self.packing = packing
        self.cfg = cfg or LoaderConfig()
        self.decoder = SampleDecoder(sizing, self.cfg.spec if self.cfg.spec_augment else None)
        self.augment = augment
        self.cache = self.cfg.cache()

    def __len__(self) -> int:
        return self.num_steps

    def plan(self, step: int) -> MicroBatchPlan:
        """The plan of one step."""
        return self.plans[step] if isinstance(self.plans, Sequence) else self.plans(step)

    def __getitem__(self, item: Item) -> LoadedStep:
        step, plan = item if isinstance(item, tuple) else (item, self.plan(item))
        return self.load(step, plan)

    def load(self, step: int, plan: MicroBatchPlan) -> LoadedStep:
        """Read, decode and pack one planned micro-batch; bad samples are left out and listed."""
        skips: list[Skip] = []
        good: list[tuple[SampleRef, torch.Tensor, torch.Tensor, str]] = []
        for position, fetched in enumerate(fetch_samples(plan.samples, max_bytes=self.cfg.max_sample_bytes,
                                                                 cache=self.cache)):
            ref = fetched.ref
            if fetched.reason:
                skips.append(Skip(position, ref.shard, ref.key, fetched.reason, fetched.detail))
                continue
            try:
                caption, _ = caption_and_group(fetched.sample, ref.key)
                if not caption:
                    raise DecodeError("empty", "no caption")
                kind, data = media_member(fetched.sample, ref.modality)
                seed = ref.augment_seed if self.augment else None
                patches, coords = self.decoder.encoded(ref.modality, kind, data, ref.grid, seed, ref.native)
            except (DecodeError, ValueError) as err:
                reason = err.reason if isinstance(err, DecodeError) else "undecodable"
                skips.append(Skip(position, ref.shard, ref.key, reason, str(err)))
                continue
            good.append((ref, patches, coords, caption))
        captions = encode_captions(self.tokenizer, [caption for *_, caption in good], self.cfg.max_caption_tokens)
        samples = [PatchedSample(key=ref.key, modality=ref.modality, patches=patches, coords=coords, caption_ids=ids,
                                 group=group_id(ref.group), num_kept=ref.grid.num_kept, drop_seed=ref.drop_seed)
                   for (ref, patches, coords, _), ids in zip(good, captions)]
        batch = pack_samples(samples, self.packing)
        reasons = Counter(skip.reason for skip in skips)
        batch.counters.update({"planned": len(plan.samples), "skipped": len(skips),
                               **{f"skipped_{r}": reasons.get(r, 0) for r in SKIP_REASONS},
                               **source_counters(plan.samples, skips)})
        return LoadedStep(step, batch, len(plan.samples), skips)


def source_counters(refs: Sequence[SampleRef], skips: Sequence[Skip]) -> dict[str, int]:
    """`source/NAME/samples` (used) and `source/NAME/skipped` of a batch's named sources (none for one dataset)."""
    planned = Counter(ref.source for ref in refs if ref.source)
    skipped = Counter(refs[skip.position].source for skip in skips if refs[skip.position].source)
    counters = {}
    for name, count in planned.items():
        counters[f"source/{name}/samples"] = count - skipped[name]
        counters[f"source/{name}/skipped"] = skipped[name]
    return counters


class FailureGuard:
    """Counts consecutive bad samples across steps (in step order) and logs skips at a limited rate."""

    def __init__(self, max_consecutive_failures: int, log_interval_s: float) -> None:
        self.max_consecutive_failures = max_consecutive_failures
        self.log_interval_s = log_interval_s
        self.run = 0
        self._unlogged: Counter[str] = Counter()
        self._last_log = float("-inf")

    def update(self, loaded: LoadedStep) -> None:
        """Account one step; raises TooManyFailures when the run of bad samples reaches the limit."""
        expected = 0
        for skip in loaded.skips:
            self.run = self.run + 1 if skip.position == expected else 1
            expected = skip.position + 1
            if self.run >= self.max_consecutive_failures:
                raise TooManyFailures(f"{self.run} bad samples in a row; the last is key {skip.key!r} in shard "
                                      f"{skip.shard} ({skip.reason}: {skip.detail})")
        if expected < loaded.planned:
            self.run = 0
        self._log(loaded)

    def _log(self, loaded: LoadedStep) -> None:
        """One warning per interval with the counts since the previous one and the latest example."""
        self._unlogged.update(skip.reason for skip in loaded.skips)
        now = time.monotonic()
        if loaded.skips and now - self._last_log >= self.log_interval_s:
            last = loaded.skips[-1]
            logger.warning("skipped bad samples %s; latest: key %s in %s (%s: %s)", dict(self._unlogged),
                           last.key, last.shard, last.reason, last.detail)
            self._unlogged.clear()
            self._last_log = now


class _StepSampler(Sampler[tuple[int, MicroBatchPlan]]):
    """(step, plan) of steps [start, stop), planned here in the main process; `start` moves on resume without
    rebuilding (persistent) workers."""

    def __init__(self, dataset: PlanDataset, start: int, stop: int) -> None:
        self.dataset, self.start, self.stop = dataset, start, stop

    def __iter__(self) -> Iterator[tuple[int, MicroBatchPlan]]:
        return ((step, self.dataset.plan(step)) for step in range(self.start, self.stop))

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)


class PlanLoader:
    """Iterates PackedBatches of steps [start_step, len(dataset)) through a DataLoader with W workers."""

    def __init__(self, dataset: PlanDataset, workers: int = 0, max_consecutive_failures: int = 100,
                 start_step: int = 0, persistent_workers: bool = True) -> None:
        self.dataset = dataset
        self.sampler = _StepSampler(dataset, start_step, len(dataset))
        self.guard = FailureGuard(max_consecutive_failures, dataset.cfg.log_interval_s)
        self.next_step = start_step
        extra = {"prefetch_factor": dataset.cfg.prefetch_factor, "persistent_workers": persistent_workers} \
            if workers else {}
        # Pinned batches let `PackedBatch.to(device)` copy asynchronously while the step runs.
        self.loader = DataLoader(dataset, batch_size=None, sampler=self.sampler, num_workers=workers,
                                 collate_fn=_identity, pin_memory=torch.cuda.is_available(), **extra)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[PackedBatch]:
        self.sampler.start = self.next_step
        for loaded in self.loader:
            self.guard.update(loaded)
            self.next_step = loaded.step + 1
            yield loaded.batch

    def state_dict(self) -> dict[str, int]:
        """Position (next step) and the running count of consecutive failures."""
        return {"next_step": self.next_step, "failure_run": self.guard.run}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved position; the next iteration starts there."""
        self.next_step = int(state["next_step"])
        self.guard.run = int(state["failure_run"])


def _identity(item: LoadedStep) -> LoadedStep:
    """No collation: a step is already one batch (a module-level function, so workers can pickle it)."""
    return item


def decode_plans(plans: Sequence[MicroBatchPlan], tokenizer: PreTrainedTokenizerBase, sizing: SizingConfig,
                 packing: PackingConfig, workers: int = 0, max_consecutive_failures: int = 100,
                 cfg: LoaderConfig | None = None) -> list[dict[str, int]]:
    """Really read and decode every planned step (`plait data walk --decode`); per step: samples and skip counts."""
    loader = PlanLoader(PlanDataset(plans, tokenizer, sizing, packing, cfg), workers, max_consecutive_failures,
                        persistent_workers=False)
    keys = ("planned", "samples", "tokens", "skipped", *(f"skipped_{r}" for r in SKIP_REASONS))
    return [{"step": plan.step, **{k: batch.counters[k] for k in keys}} for plan, batch in zip(plans, loader)]
