"""One GRPO update of the tiny model, alone or as one rank under torchrun (tests/test_distributed.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT.pt [seq-mean]

Rank 0 takes the first 4 of 6 sequences, rank 1 the last 2: ranks with different numbers of micro-batches.
"""

import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from grpo import add_lora, ddp, grpo_update, init_distributed, load_model  # noqa: E402

SPLIT = 4  # rank 0: sequences [0, 4), rank 1: [4, 6)


def case(token_mean=True):
    """(model, optimizer, seqs, advantages, args): the same on every rank and in the single-process run."""
    model, tok = load_model("smollm2-135m", device="cpu", dtype="fp32")
    params = add_lora(model, rank=4)
    g = torch.Generator().manual_seed(0)
    for p in params:  # non-zero A and B: gradients reach both
        p.data = torch.randn(p.shape, generator=g) * 0.02
    seqs = [(torch.randint(100, 40000, (20 + 3 * i,), generator=g).tolist(),
             torch.randint(100, 40000, (5 + 2 * i,), generator=g).tolist()) for i in range(6)]
    adv = [1.0, -1.0, 0.5, -0.5, 1.5, -1.5]
    args = types.SimpleNamespace(micro_batch=2, ppo_epochs=2, clip_eps=0.2, beta=0.01, max_grad_norm=1e9, token_mean=token_mean)
    optimizer = torch.optim.SGD(params, lr=1e-2)  # the update is the gradient itself (Adam's first step is ~sign(g))
    return model, optimizer, seqs, adv, args


def adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


if __name__ == "__main__":
    rank, world = init_distributed()
    model, optimizer, seqs, adv, args = case(token_mean=sys.argv[2:] != ["seq-mean"])
    ddp(model)
    mine = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    stats = grpo_update(model, optimizer, seqs[mine], adv[mine], args)
    if rank == 0:
        torch.save(dict(adapters=adapters(model), stats=stats), sys.argv[1])
