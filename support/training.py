"""A training run's harness, shared by train_wm.py and train_policy.py (TRY NOT TO MODIFY): the fine-tuning
flags, the start of a run (model, reference policy, LoRA, optimizer, --resume), the optimizer step that skips a
non-finite update, and checkpoints (an HF folder any stage loads with --model, plus what --resume needs)."""

import copy
import os
import random
from pathlib import Path

import numpy as np
import torch

from support.checks import at_least, fail, finite, non_negative, positive
from support.distributed import all_sum, ddp, is_sharded, rank_world, shard
from support.lm import checkpoint_activations, load_model, torch_dtype
from support.lora import add_lora, has_adapters, merged_state_dict
from support.runs import aside, find_checkpoint, remove_checkpoint, set_seed, swap_in


def add_grpo_args(p, lr=1e-6, lr_help="paper: 1e-6"):
    """The flags `start_training` and `grpo_update` read, for train_wm.py and train_policy.py."""
    arg = p.add_argument_group("GRPO update and fine-tuning").add_argument
    arg("--lr", type=positive(), default=lr, help=f"AdamW rate ({lr_help}; LoRA wants ~1e-4, BUDGET=paper 1e-5)")
    arg("--clip-eps", type=positive("the ratio is clipped to [1 - eps, 1 + eps]"), default=0.2, help="clip's epsilon")
    arg("--beta", type=non_negative(), default=0.001, help="KL coefficient to the starting policy (0: no reference)")
    arg("--ppo-epochs", type=at_least(), default=1, help="mu: optimisation passes over each sampled batch")
    seq_mean = "the loss per sequence, then over sequences (GRPO's form; default: the token mean of the batch)"
    arg("--seq-mean", dest="token_mean", action="store_false", help=seq_mean)
    mb = "sequences per forward/backward (default 8; on a card: as many as the memory plan fits, up to an update's)"
    arg("--micro-batch", type=at_least(), default=None, help=mb)
    arg("--max-grad-norm", type=positive(), default=1.0, help="gradient clipping")
    rank = at_least(0, "0 is full fine-tuning")
    arg("--lora-rank", type=rank, default=0, help="0: full fine-tuning; r > 0: hand-written LoRA adapters")
    arg("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="weights (auto: bf16 on CUDA, fp32 on CPU)")
    arg("--fsdp", action="store_true", help="torchrun, full fine-tuning: shard weights, grads, AdamW over ranks")
    arg("--grad-checkpointing", action="store_true", help="recompute each layer in backward (less memory)")
    arg("--resume", action="store_true", help="continue from --out/checkpoint (or checkpoint.tmp, .old)")
    arg("--keep-optimizer", action="store_true", help="keep AdamW's state in the last checkpoint too (for --resume)")
    arg("--max-memory-gb", type=positive(), help="memory per device: batches halved until the memory plan fits")
    arg("--dry-run", action="store_true", help="print the memory and time plans, and exit")


def clip_gradients(model, max_norm):
    """Scale the trainable gradients to a total norm of at most max_norm; returns the norm before (a float)."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # FSDP: a distributed tensor


def optimizer_step(model, optimizer, loss, max_grad_norm):
    """Clip the gradients and step, unless the loss (summed over ranks) or the gradient norm is not finite:
    then the step is skipped and no weight changes. Frees the gradients either way. Returns (grad norm, skipped)."""
    grad_norm = clip_gradients(model, max_grad_norm)  # the norm of all ranks' gradients: every rank decides alike
    skipped = not finite(all_sum([loss])[0], grad_norm)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # free the gradients: the next rollouts need the memory
    return grad_norm, skipped


def check_precision(args):
    """Full fine-tuning only in fp32 weights: AdamW updates bf16 weights in place, and a step of lr 1e-6 on a
    weight of ~0.02 is far below half a bf16 step there (1.2e-4 / 2), so nearly every update rounds away (the
    run would "train" with almost no effect). LoRA keeps its adapters in fp32 on bf16 weights. fp32 weights on
    CUDA compute their matrix products in TF32 (`lm.tf32_matmuls`): the weights and AdamW's state stay fp32."""
    if not args.lora_rank and torch_dtype(args.dtype) == torch.bfloat16:
        auto = ", bf16 on CUDA" if args.dtype == "auto" else ""
        fail(
            f"full fine-tuning with bf16 weights (--dtype {args.dtype}{auto}) rounds its updates away: "
            "pass --dtype fp32 (fp32 weights), or --lora-rank R (fp32 adapters)"
        )


def start_training(args, ckpt, reference):
    """What a training script needs from args (model, dtype, lora_rank, lr, beta, resume) and its checkpoint
    folder: (model, tok, ref_model, optimizer, first step). With --resume the weights (full fine-tuning)
    or the adapters (LoRA), the optimizer and the RNG come from `ckpt`. The reference policy is the
    *starting* model: a frozen copy of args.model for full fine-tuning (None when `reference` is False
    or beta = 0), the same weights with adapters off under LoRA (also None here)."""
    check_precision(args)  # the scripts' check_args ran it already: here for any other caller
    ckpt = Path(ckpt)
    # rank 0 finds the newest complete checkpoint (and finishes a swap a kill cut short); the other ranks wait
    if args.resume and not all_sum([rank_world()[0] == 0 and find_checkpoint(ckpt) is not None])[0]:
        raise SystemExit(f"error: --resume: no complete checkpoint in {ckpt} (nor in {ckpt.name}.tmp, .old)")
    full_resume = args.resume and not args.lora_rank
    model, tok = load_model(str(ckpt / "model") if full_resume else args.model, dtype=args.dtype)
    ref_model = None
    if reference and args.beta > 0 and not args.lora_rank:
        ref_model = load_model(args.model, dtype=args.dtype)[0] if full_resume else copy.deepcopy(model)
        ref_model.requires_grad_(False)
    if args.fsdp and (args.lora_rank or rank_world()[1] == 1):
        raise SystemExit(
            "error: --fsdp shards full fine-tuning over torchrun's ranks: use it without --lora-rank, under torchrun"
        )
    if args.fsdp and ref_model is not None:
        shard(ref_model)  # the reference too: each rank keeps 1 / N of it
    params = (
        add_lora(model, args.lora_rank) if args.lora_rank else list((shard(model) if args.fsdp else model).parameters())
    )
    if args.grad_checkpointing:  # only active in model.train(), i.e. in the updates, not while sampling
        checkpoint_activations(model)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=True)  # fused: no temporary copies
    step = load_checkpoint(ckpt, model, optimizer) if args.resume else 0
    rank, world = rank_world()
    if args.resume and rank > 0:  # the checkpoint holds rank 0's RNG: the other ranks draw their own
        set_seed(args.seed + 1000 * step + rank)
    ddp(model)  # under torchrun: wrapped now, so every rank starts from rank 0's weights (LoRA's random A too)
    return model, tok, ref_model, optimizer, step


def save_checkpoint(folder, model, tok, optimizer, step, args, final=False):
    """folder/model: plain HF weights (adapters merged); folder/trainer.pt: step, optimizer, adapters, RNG.
    Written aside (folder.tmp, trainer.pt last) and swapped in (runs.swap_in), so a kill at any instant keeps a
    complete checkpoint that --resume finds. The `final` save of a run drops the optimizer state (2x the weights
    under full fine-tuning) unless args.keep_optimizer. Under LoRA only the `final` save writes folder/model:
    --resume needs the adapters alone, and the merged fp32 weights (7B: ~30 GB) would be written at every save.
    Under torchrun rank 0 writes (every rank holds the same weights and optimizer state)."""
    rank = rank_world()[0]
    keep_optimizer = not final or getattr(args, "keep_optimizer", False)
    with_model = final or not has_adapters(model)
    if is_sharded(model):  # every rank sends its shards; rank 0 gets the whole weights and optimizer state
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=whole)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=whole) if keep_optimizer else None
    elif rank == 0:
        weights, lost = merged_state_dict(model) if with_model else ({}, 0.0)
        optimizer_state = optimizer.state_dict() if keep_optimizer else None
    if rank > 0:
        return
    adapters = {
        n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad and n.endswith((".A", ".B"))
    }
    if not is_sharded(model) and lost > 0:
        print(
            f"checkpoint step {step}: {100 * lost:.1f}% of the LoRA-merged weights changed by less than half a bf16 "
            "step: saved in fp32 (--dtype fp32 loads them as trained, a bf16 load rounds those changes away)"
        )
    # a sum is finite only if every term is (NaN and Inf carry through it), and is ~10x cheaper than isfinite(w).all();
    # a sum that overflows is looked at element by element
    all_finite = lambda w: torch.isfinite(w.sum()) or torch.isfinite(w).all()
    bad = next((k for k, w in {**weights, **adapters}.items() if w.is_floating_point() and not all_finite(w)), None)
    if bad:  # the previous checkpoint stays as it was
        fail(f"step {step}: weight {bad} is not finite: no checkpoint written (the one in {folder}, if any, is kept)")
    folder = Path(folder)
    tmp = aside(folder, "tmp")
    remove_checkpoint(tmp)
    tmp.mkdir(parents=True)
    if with_model:
        model.save_pretrained(tmp / "model", state_dict=weights)
        tok.save_pretrained(tmp / "model")
    torch.save(
        dict(
            step=step,
            optimizer=optimizer_state,  # None: a finished run's (--keep-optimizer keeps it)
            adapters=adapters or None,
            args=vars(args),
            rng=dict(
                python=random.getstate(),
                numpy=np.random.get_state(),
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,  # CPU tensors
            ),
        ),
        tmp / "trainer.pt.part",
    )
    os.rename(tmp / "trainer.pt.part", tmp / "trainer.pt")  # now complete
    swap_in(tmp, folder)


def load_checkpoint(folder, model, optimizer):
    """Restore adapters (the full weights come from folder/model via load_model), optimizer and RNG; the step.
    Read onto the CPU (a GPU run's checkpoint opens on a machine without one; each tensor then goes where its
    parameter is, not every rank's to cuda:0). Under FSDP the file is memory-mapped (no rank reads its tensors into
    memory of its own) and only rank 0 reads the AdamW state, tensor by tensor, broadcast to the others, which keep
    their shards (`broadcast_from_rank0`; 7B in fp32: ~61 GB that every rank would otherwise load). The CUDA
    generators' states are restored where CUDA is, so a resumed GPU run samples as the uninterrupted one would."""
    sharded = is_sharded(model)
    state = torch.load(Path(folder) / "trainer.pt", map_location="cpu", weights_only=False, mmap=sharded)
    if state["adapters"]:
        model.load_state_dict(state["adapters"], strict=False)
    if sharded and state["optimizer"] is not None:  # rank 0 reads the whole AdamW state and sends each rank its shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        whole = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(model, optimizer, state["optimizer"] if rank_world()[0] == 0 else {}, options=whole)
    elif state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if state["optimizer"] is None and rank_world()[0] == 0:
        print(
            f"--resume: {folder} is a finished run saved without its AdamW state (--keep-optimizer keeps it): "
            f"the updates after step {state['step']} start AdamW afresh"
        )
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    restore_cuda_rng(state["rng"].get("cuda"))
    return state["step"]


def restore_cuda_rng(states):
    """Each CUDA device's generator state as saved (as many devices as both machines have); none on a CPU."""
    if states is not None and torch.cuda.is_available():
        for i, s in enumerate(states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
