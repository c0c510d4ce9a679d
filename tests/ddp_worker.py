"""One GRPO update of the tiny model, alone or as one rank under torchrun (tests/test_distributed.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT_DIR token-mean seq-mean fsdp \
        [-- SCRIPT ARG ...] ...

writes OUT_DIR/<mode>.pt for each mode named, one after the other in the same ranks; then runs each
`-- SCRIPT ARG ...` in these ranks as `torchrun SCRIPT ARG ...` would (its `__main__`; the ranks start once).

Rank 0 takes the first 4 of 6 sequences, rank 1 the last 2: ranks with different numbers of micro-batches.
token-mean / seq-mean: LoRA under DDP; fsdp: full fine-tuning and its reference model sharded by FSDP2.
"""

import copy
import runpy
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from grpo import grpo_update  # noqa: E402
from support.distributed import ddp, init_distributed, shard  # noqa: E402
from support.lm import load_model  # noqa: E402
from support.lora import add_lora  # noqa: E402

SPLIT = 4  # rank 0: sequences [0, 4), rank 1: [4, 6)
CHECKED = ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight", "model.norm.weight")


def case(mode):
    """(model, reference, seqs, advantages, args): the same on every rank and in the single-process run."""
    model, tok = load_model("smollm2-135m", device="cpu", dtype="fp32")
    g = torch.Generator().manual_seed(0)
    ref = None
    if mode == "fsdp":
        ref = copy.deepcopy(model).requires_grad_(False)
    else:
        for p in add_lora(model, rank=4):  # non-zero A and B: gradients reach both
            p.data = torch.randn(p.shape, generator=g) * 0.02
    seqs = [
        (
            torch.randint(100, 40000, (20 + 3 * i,), generator=g).tolist(),
            torch.randint(100, 40000, (5 + 2 * i,), generator=g).tolist(),
        )
        for i in range(6)
    ]
    adv = [1.0, -1.0, 0.5, -0.5, 1.5, -1.5]
    epochs = 1 if mode == "fsdp" else 2  # DDP: a second optimiser step, on the ratio to the first step's weights
    args = types.SimpleNamespace(
        micro_batch=2, ppo_epochs=epochs, clip_eps=0.2, beta=0.01, max_grad_norm=1e9, token_mean=mode != "seq-mean"
    )
    return model, ref, seqs, adv, args


def optimizer_for(model):
    # SGD: the update is the gradient itself (Adam's first step is ~sign(g), blind to a wrong scale)
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def trained(model):
    """The tensors compared: LoRA adapters, or a few full weights."""
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and (n.endswith((".A", ".B")) or n in CHECKED)
    }


if __name__ == "__main__":
    rank, world = init_distributed()
    out, *rest = sys.argv[1:]
    cuts = [i for i, a in enumerate(rest) if a == "--"] + [len(rest)]
    modes, commands = rest[: cuts[0]], [rest[a + 1 : b] for a, b in zip(cuts, cuts[1:])]
    for mode in modes:
        model, ref, seqs, adv, args = case(mode)
        if mode == "fsdp":
            shard(model)
            shard(ref)
        ddp(model)
        mine = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        stats = grpo_update(model, optimizer_for(model), seqs[mine], adv[mine], args, ref)
        if mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            weights = {n: full[n] for n in CHECKED if n in full}
        else:
            weights = trained(model)
        if rank == 0:
            torch.save(dict(weights=weights, stats=stats), Path(out) / f"{mode}.pt")
    for script, *argv in commands:
        sys.argv = [script, *argv]
        runpy.run_path(script, run_name="__main__")
        torch.distributed.barrier()  # as a new torchrun would: the next starts once every rank is done (rank 0 saved)
