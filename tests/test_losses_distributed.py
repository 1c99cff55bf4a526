"""World size 2 (real gloo process group) equals world size 1 on the same global batch.

Each step's global batch is split unevenly over two ranks (rank 1 lacks video in one step and
has no sample, token or caption token at all in another). The parent computes the same steps
on one process; the children save their per-rank losses, gradients and queues. After
DeepSpeed-style averaging of gradients over ranks, everything must match.
"""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from plait.trainer.losses.config import HardNegativeConfig, LossConfig, QueueConfig
from plait.trainer.losses.objective import Objective, ObjectiveInputs
from plait.trainer.model.routing import RouterOutput

F64 = torch.float64
D_IN, D, EXPERTS, VOCAB = 6, 4, 3, 7
WEIGHTS = {"contrastive": 1.0, "caption": 0.5, "balance": 0.3, "z": 0.2, "entropy_local": 0.1, "entropy_global": 0.1}
# Rows owned by rank 0 in each step (rank 1 owns the rest): uneven, then everything, then few.
SPLITS = (6, 10, 2)
STEPS = len(SPLITS)


def parameters() -> dict[str, torch.Tensor]:
    """The same small 'model' on every process: embedding projection, two routers, a caption head."""
    g = torch.Generator().manual_seed(123)
    shapes = {"proj": (2 * D, D_IN), "router0": (EXPERTS, D_IN), "router1": (EXPERTS, D_IN), "head": (VOCAB, D_IN)}
    return {k: torch.randn(s, generator=g, dtype=F64).requires_grad_() for k, s in shapes.items()}


def global_batch(step: int) -> dict:
    """Ten samples (rank 0's rows first), their router tokens and caption tokens."""
    g = torch.Generator().manual_seed(1000 + step)
    n = 10
    modality = torch.tensor([0, 2, 1, 0, 2, 0, 1, 0, 1, 0])
    tokens_per_sample = torch.randint(1, 4, (n,), generator=g)
    captions_per_sample = torch.randint(0, 3, (n,), generator=g)
    targets = torch.randint(0, VOCAB, (int(captions_per_sample.sum()),), generator=g)
    targets[::3] = -100
    return {
        "x": torch.randn(n, D_IN, generator=g, dtype=F64),
        "modality": modality,
        "keys": [f"s{(step * 7 + i) % 13}" for i in range(n)],  # keys recur across steps
        "group": torch.tensor([0, 1, 2, 0, 3, 4, 2, 5, 6, 4]) + 10 * (step % 2),
        "caption": torch.tensor([-1, -1, 7, -1, -1, 8, -1, 8, 7, -1]),
        "tokens": torch.randn(int(tokens_per_sample.sum()), D_IN, generator=g, dtype=F64),
        "token_owner": torch.repeat_interleave(torch.arange(n), tokens_per_sample),
        "token_modality": torch.randint(0, 4, (int(tokens_per_sample.sum()),), generator=g),
        "caption_feats": torch.randn(len(targets), D_IN, generator=g, dtype=F64),
        "caption_owner": torch.repeat_interleave(torch.arange(n), captions_per_sample),
        "targets": targets,
    }


def local_inputs(batch: dict, params: dict, rows: range) -> ObjectiveInputs:
    """This rank's part of the global batch, pushed through the shared parameters."""
    sel = torch.tensor(list(rows), dtype=torch.long)
    emb = batch["x"][sel] @ params["proj"].T
    tok = torch.isin(batch["token_owner"], sel)
    cap = torch.isin(batch["caption_owner"], sel)
    routers = []
    for name in ("router0", "router1"):
        logits = batch["tokens"][tok] @ params[name].T
        routers.append(RouterOutput(logits, logits.detach().topk(2, dim=1).indices, batch["token_modality"][tok]))
    return ObjectiveInputs(
        media_embeds=emb[:, :D],
        text_embeds=emb[:, D:],
        modality=batch["modality"][sel],
        sample_key=[batch["keys"][i] for i in rows],
        group=batch["group"][sel],
        caption_id=batch["caption"][sel],
        caption_logits=batch["caption_feats"][cap] @ params["head"].T,
        caption_targets=batch["targets"][cap],
        router_outputs=routers,
    )


def configs() -> dict[str, LossConfig]:
    """Full softmax with queue and soft labels; and sampled hard negatives (deterministic top-k)."""
    full = LossConfig(queue=QueueConfig(size=12))
    full.contrastive.label_smoothing = 0.1
    hard = LossConfig(queue=QueueConfig(size=8), hard_negatives=HardNegativeConfig(num_negatives=3, hard_fraction=1.0))
    return {"full": full, "hard": hard}


def run_steps(rank: int, world: int) -> dict:
    """Every step of every config on this rank: per-rank loss, raw local gradients, queues."""
    out: dict = {}
    for name, config in configs().items():
        params = parameters()
        objective = Objective(config, embed_dim=D).double()
        for step, split in enumerate(SPLITS):
            rows = range(10) if world == 1 else (range(split) if rank == 0 else range(split, 10))
            result = objective(local_inputs(global_batch(step), params, rows), step=step, weights=WEIGHTS)
            leaves = [*params.values(), objective.contrastive.logit_scale]
            grads = torch.autograd.grad(result.loss, leaves)
            out[(name, step)] = {
                "loss": result.loss.detach(),
                "grads": [g.detach() for g in grads],
                "queues": {k: v.clone() for k, v in objective.queues.state_dict().items() if torch.is_tensor(v)},
            }
    return out


def _child(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        assert dist.get_world_size() == 2
        results = run_steps(rank, world)
        torch.save({"world_size": dist.get_world_size(), "results": results}, os.path.join(folder, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    folder = str(tmp_path_factory.mktemp("ranks"))
    mp.spawn(_child, args=(2, free_port(), folder), nprocs=2, join=True)
    return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def one_rank() -> dict:
    assert not dist.is_initialized()
    return run_steps(0, 1)


@pytest.mark.distributed
def test_world_size_is_two(two_ranks):
    assert [r["world_size"] for r in two_ranks] == [2, 2]


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["full", "hard"])
@pytest.mark.parametrize("step", range(STEPS))
def test_losses_and_averaged_gradients_equal_world_size_one(two_ranks, one_rank, config, step):
    ranks = [r["results"][(config, step)] for r in two_ranks]
    want = one_rank[(config, step)]
    # Each rank returns its share; the mean over ranks is the global loss.
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, want["loss"], rtol=1e-10, atol=1e-12)
    for g0, g1, g in zip(ranks[0]["grads"], ranks[1]["grads"], want["grads"]):
        # DeepSpeed averages gradients over data-parallel ranks.
        torch.testing.assert_close((g0 + g1) / 2, g, rtol=1e-9, atol=1e-12)


@pytest.mark.distributed
@pytest.mark.parametrize("step", range(STEPS))
def test_queues_are_identical_on_every_rank_and_to_world_size_one(two_ranks, one_rank, step):
    for config in ("full", "hard"):
        want = one_rank[(config, step)]["queues"]
        for r in two_ranks:
            got = r["results"][(config, step)]["queues"]
            assert got.keys() == want.keys()
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-14)
