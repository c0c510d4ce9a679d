"""GRPO (Shao et al., 2024) written by hand: how RWML trains its world model (paper Sec. 3.2) and how policy
learning trains the agent (Sec. 3.3). For G samples o_1..o_G of one prompt with rewards r_1..r_G:

    A_i     = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)                 group advantage   group_advantages
    rho_i,t = pi_theta(o_i,t | prompt, o_i,<t) / pi_old(o_i,t | ...)         probability ratio grpo_loss
    L_i,t   = min(rho_i,t A_i, clip(rho_i,t, 1 - eps, 1 + eps) A_i) - beta KL_i,t                 grpo_loss
    KL_i,t  = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1                  k3 estimator      grpo_loss
    loss    = - sum_i,t L_i,t / (completion tokens in the batch)              token mean        grpo_update
              (--seq-mean: each sequence's mean, then the mean over sequences, the GRPO paper's form)

pi_old is the policy that sampled (the weights before the update), pi_ref the starting policy. Below, in
order: the GRPO flags, the algorithm (ALGO LOGIC), hand-written LoRA, and the start of a training run
(model, reference, optimizer, checkpoints, --resume). The plumbing sits in support/: lm.py (models,
sampling), runs.py (JSONL, curves), distributed.py (torchrun), memory.py (the memory plan).
"""

import copy
import os
import random
from pathlib import Path

import numpy as np
import torch

from support.checks import at_least, fail, finite, non_negative, positive
from support.distributed import all_sum, ddp, is_sharded, micro_batches, rank_world, shard
from support.lm import LORA_TARGETS, checkpoint_activations, load_model, torch_dtype
from support.memory import check_lora_targets
from support.runs import aside, find_checkpoint, remove_checkpoint, set_seed, swap_in


# ---------------------------------------------------------------------------------------------
# The GRPO flags, shared by train_wm.py and train_policy.py
# ---------------------------------------------------------------------------------------------
def add_grpo_args(p, lr=1e-6, lr_help="paper: 1e-6"):
    """The flags `start_training` and `grpo_update` read, for train_wm.py and train_policy.py."""
    g = p.add_argument_group("GRPO update and fine-tuning")
    g.add_argument(
        "--lr",
        type=positive(),
        default=lr,
        help=f"AdamW learning rate ({lr_help}, full fine-tuning; LoRA wants ~1e-4, BUDGET=paper: 1e-5)",
    )
    g.add_argument(
        "--clip-eps",
        type=positive("the ratio is clipped to [1 - eps, 1 + eps]"),
        default=0.2,
        help="epsilon of the clipped ratio",
    )
    g.add_argument(
        "--beta",
        type=non_negative(),
        default=0.001,
        help="KL coefficient to the reference (starting) policy (0: no reference pass)",
    )
    g.add_argument("--ppo-epochs", type=at_least(), default=1, help="mu: optimisation passes over each sampled batch")
    g.add_argument(
        "--seq-mean",
        dest="token_mean",
        action="store_false",
        help="average the loss per sequence, then over sequences (the GRPO paper's form; without it: the token "
        "mean over all completion tokens of the batch)",
    )
    g.add_argument(
        "--micro-batch", type=at_least(), default=8, help="sequences per forward/backward (gradient accumulation)"
    )
    g.add_argument("--max-grad-norm", type=positive(), default=1.0, help="gradient clipping")
    g.add_argument(
        "--lora-rank",
        type=at_least(0, "0 is full fine-tuning"),
        default=0,
        help="0: full fine-tuning; r > 0: hand-written LoRA adapters",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="weights dtype (auto: bf16 on CUDA, fp32 on CPU)",
    )
    g.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun, full fine-tuning: shard weights, gradients and "
        "AdamW moments over the ranks (FSDP2) instead of a whole copy per rank (DDP)",
    )
    g.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="keep only each layer's input for backward and recompute the rest (less memory, ~1.3x compute)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from --out/checkpoint (or the newest complete one beside it: checkpoint.tmp, .old)",
    )
    g.add_argument(
        "--keep-optimizer",
        action="store_true",
        help="keep the AdamW state in the last checkpoint too (2x the weights under full fine-tuning), so that "
        "--resume with more steps continues it; by default only the checkpoints of an unfinished run keep it",
    )
    g.add_argument(
        "--max-memory-gb",
        type=positive(),
        default=None,
        help="memory per device: halve --micro-batch and the sampling batch until the memory plan fits",
    )
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="print the memory plan (weights, grads, AdamW, activations, KV cache) and the time plan, and exit",
    )


# ---------------------------------------------------------------------------------------------
# GRPO (ALGO LOGIC: the lines a reader should study)
# ---------------------------------------------------------------------------------------------
def group_advantages(rewards, group_size, eps=1e-4):
    """Rewards of consecutive groups of G samples of one prompt -> advantages, and the number of groups
    whose rewards are all equal (their advantages are 0: no learning signal)."""
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)
    # ---- EXERCISE 3: group-normalised advantages (paper Sec. 3.2) ----
    # Eq. GRPO advantage: A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)   (std: unbiased, as in TRL)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    # ---- END EXERCISE 3 ----
    return adv.view(-1), int((r.std(1) == 0).sum())


def collate(seqs, device):
    """[(prompt_ids, completion_ids)] -> prompts left-padded and completions right-padded, so every
    completion starts at the same column P and only columns >= P-1 need logits."""
    P = max(len(p) for p, _ in seqs)
    C = max(1, max(len(c) for _, c in seqs))
    ids = torch.zeros((len(seqs), P + C), dtype=torch.long)  # padding is masked out: its id does not matter
    attn = torch.zeros_like(ids)
    for i, (p, c) in enumerate(seqs):
        ids[i, P - len(p) : P + len(c)] = torch.tensor(p + c)
        attn[i, P - len(p) : P + len(c)] = 1
    return ids.to(device), attn.to(device), P


def completion_logits(model, ids, attn, P):
    """The logits that predict every completion token, [B, C, vocab] in fp32 (collate's layout); positions
    count from each row's first real token."""
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    out = model(
        input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=ids.shape[1] - P + 1, use_cache=False
    )
    return out.logits[:, :-1].float()  # the logits at column t predict the token at t + 1


def completion_logprobs(model, ids, attn, P, with_entropy=False, temperature=1.0):
    """log pi(token) of every completion token, [B, C]; at a sampling temperature T > 0, of the distribution that
    sampled them, softmax(logits / T) (T = 0, greedy, has none: the model's own, T = 1)."""
    logits = completion_logits(model, ids, attn, P)
    if temperature not in (0, 1):
        logits = logits.div_(temperature)  # in place: no second [B, C, vocab] table (the memory plan counts one)
    # log softmax of the taken token alone: no [B, C, vocab] table of log-probabilities is kept for backward
    logp = logits.gather(-1, ids[:, P:, None]).squeeze(-1) - logits.logsumexp(-1)
    entropy = None
    if with_entropy:  # a diagnostic, outside the autograd graph, one row at a time (no [B, C, vocab] temporaries)
        with torch.no_grad():
            entropy = torch.stack([-(row.softmax(-1) * row.log_softmax(-1)).sum(-1) for row in logits])
    return logp, entropy


def grpo_loss(logp, old_logp, ref_logp, adv, mask, clip_eps, beta, norm):
    """Sum over this micro-batch of the GRPO per-token loss, divided by `norm` (see `grpo_update`)."""
    # ---- EXERCISE 4: the clipped surrogate (paper Sec. 3.2) ----
    # Eq. GRPO clipped surrogate: min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = pi / pi_old per token
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * adv[:, None], ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv[:, None])
    # ---- END EXERCISE 4 ----
    # ---- EXERCISE 5: the k3 KL to the reference policy (paper Sec. 3.2) ----
    # Eq. KL to the reference, k3 estimator (http://joschu.net/blog/kl-approx.html): pi_ref/pi - log(pi_ref/pi) - 1
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1 if ref_logp is not None else torch.zeros_like(logp)
    # ---- END EXERCISE 5 ----
    per_token = -(surrogate - beta * kl) * mask
    loss = (per_token.sum(1) / norm).sum()  # norm: [B] per-row normaliser (see grpo_update)
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return loss, dict(kl=(kl * mask).sum().item(), clipfrac=(clipped * mask).sum().item())


def grpo_update(model, optimizer, seqs, adv, args, ref_model=None):
    """One GRPO update on sampled sequences [(prompt_ids, completion_ids)] with their advantages.

    args: micro_batch, ppo_epochs (mu), clip_eps, beta, max_grad_norm, token_mean, and temperature (the
    sampling temperature, 1 if absent): the ratio's pi_old must be the distribution the sequences were sampled
    from, so every log-prob here (policy, old policy, reference) is taken at that temperature, as TRL and verl do.
    Loss averaging: token_mean=True divides every token's loss by the number of completion tokens in
    the whole batch (each token weighs the same, long completions are not diluted; DAPO); False takes
    each sequence's mean, then the mean over sequences (the GRPO paper's formula).
    The reference policy is the base weights under `adapters_off` with LoRA, else `ref_model`.
    Under torchrun each rank passes its own sequences (any number, even none) and every rank must call
    this: the batch is all ranks' sequences together, and the stats are over all of them.
    A step whose loss or gradient norm is not finite is skipped (no weight changes): `skipped` counts them.
    """
    device = next(model.parameters()).device
    net, world = ddp(model), rank_world()[1]  # net: the model, or its DDP wrapper under torchrun
    adv = torch.as_tensor(adv, dtype=torch.float32)
    lengths = torch.tensor([max(1, len(c)) for _, c in seqs], dtype=torch.float32)
    tokens, n_seqs = all_sum([lengths.sum().item(), len(seqs)])  # over all ranks
    # ---- EXERCISE 6: the loss normalisation (paper Sec. 3.2) ----
    # Eq. loss normalisation: token mean (every completion token of the batch weighs the same) or sequence mean;
    # / world because DDP averages the ranks' gradients
    norm = torch.full_like(lengths, tokens / world) if args.token_mean else lengths * n_seqs / world
    # ---- END EXERCISE 6 ----
    old, ref, T = {}, {}, getattr(args, "temperature", 1.0)
    stats = dict(loss=0.0, kl=0.0, clipfrac=0.0, entropy=0.0)
    skipped = 0
    model.train()
    for epoch in range(args.ppo_epochs):
        epoch_loss = 0.0
        # under torchrun, a rank with fewer micro-batches runs zero passes (a sharded reference's pass too)
        idle = lambda: zero_pass(net, seqs, device, ref_model if epoch == 0 and args.beta > 0 else None)
        for k, idx in enumerate(micro_batches(model, len(seqs), args.micro_batch, idle)):
            ids, attn, P = collate([seqs[i] for i in idx], device)
            mask = attn[:, P:].float()
            if args.beta > 0 and k not in ref:  # first: its transients are gone before the policy's activations
                ref[k] = reference_logprobs(model, ref_model, ids, attn, P, T)
            logp, entropy = completion_logprobs(net, ids, attn, P, with_entropy=epoch == 0, temperature=T)
            if k not in old:  # the sampling policy = the weights before this update's first step
                old[k] = logp.detach()
                stats["entropy"] += (entropy.detach() * mask).sum().item() / tokens
            loss, s = grpo_loss(
                logp, old[k], ref.get(k), adv[idx].to(device), mask, args.clip_eps, args.beta, norm[idx].to(device)
            )
            loss.backward()
            epoch_loss += loss.item()
            if epoch == args.ppo_epochs - 1:
                stats["loss"] += loss.item() / world
                stats["kl"] += s["kl"] / tokens
                stats["clipfrac"] += s["clipfrac"] / tokens
        grad_norm, skip = optimizer_step(model, optimizer, epoch_loss, args.max_grad_norm)  # no step on NaN / Inf
        skipped += skip
    model.eval()
    return dict(zip(stats, all_sum(list(stats.values()))), grad_norm=grad_norm, skipped=skipped)


def sft_update(model, optimizer, seqs, args):
    """One supervised step, WM SFT's (train_wm.py) and RFT's (train_policy.py --method rft): mean cross-entropy
    over all target tokens of the batch (under torchrun: of all ranks' batches)."""
    device = next(model.parameters()).device
    net, world = ddp(model), rank_world()[1]
    tokens = all_sum([sum(len(c) for _, c in seqs)])[0]
    model.train()
    total = 0.0
    for idx in micro_batches(model, len(seqs), args.micro_batch, lambda: zero_pass(net, seqs, device)):
        ids, attn, P = collate([seqs[i] for i in idx], device)
        logp, _ = completion_logprobs(net, ids, attn, P)
        loss = -(logp * attn[:, P:]).sum() / tokens  # Eq. SFT: -1/|y| sum_t log pi(y_t | y_<t, prompt)
        (loss * world).backward()  # x world: DDP averages the ranks' gradients
        total += loss.item()
    grad_norm, skipped = optimizer_step(model, optimizer, total, args.max_grad_norm)  # no step on NaN / Inf
    model.eval()
    return dict(loss=all_sum([total])[0], grad_norm=grad_norm, skipped=int(skipped))


@torch.no_grad()
def reference_logprobs(model, ref_model, ids, attn, P, temperature=1.0):
    """log pi_ref of the completion tokens: the base weights (adapters off) under LoRA, else the frozen copy."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        with adapters_off(model):
            return completion_logprobs(model, ids, attn, P, temperature=temperature)[0]
    return completion_logprobs(ref_model, ids, attn, P, temperature=temperature)[0]


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


def zero_pass(net, seqs, device, ref_model=None):
    """A forward and backward pass that adds nothing to the gradients, for the syncs of a rank with no data;
    with a sharded reference model, its pass first, as in `grpo_update`: collectives must come in the same
    order on every rank."""
    ids, attn, P = collate(seqs[:1] or [([0], [0])], device)
    if ref_model is not None and is_sharded(ref_model):
        with torch.no_grad():
            completion_logprobs(ref_model, ids, attn, P)
    logp = completion_logprobs(net, ids, attn, P)[0]
    (logp.sum() * 0).backward()


# ---------------------------------------------------------------------------------------------
# LoRA by hand (Hu et al., 2021): y = W x + (alpha / r) B A x, B = 0 at the start
# ---------------------------------------------------------------------------------------------
class LoRALinear(torch.nn.Module):
    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / rank, True
        self.A = torch.nn.Parameter(
            torch.randn(rank, base.in_features, device=base.weight.device) / base.in_features**0.5
        )
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))  # fp32 adapters

    def forward(self, x):
        y = self.base(x)
        if self.enabled:
            y = y + ((x.to(self.A.dtype) @ self.A.T) @ (self.scale * self.B).T).to(y.dtype)  # scale the small B
        return y


def add_lora(model, rank, alpha=None):
    """Freeze the model and wrap its attention/MLP projections with adapters; returns the trainable params.
    A mixture-of-experts model stops here in one line: its fused experts are no nn.Linear (`check_lora_targets`)."""
    check_lora_targets(model.config, rank)
    model.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in LORA_TARGETS and isinstance(child, torch.nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha or 2 * rank))
    return [p for p in model.parameters() if p.requires_grad]


class adapters_off:
    """`with adapters_off(model):` runs the base weights: the reference policy without a second copy."""

    def __init__(self, model):
        self.layers = [m for m in model.modules() if isinstance(m, LoRALinear)]

    def __enter__(self):
        for m in self.layers:
            m.enabled = False

    def __exit__(self, *exc):
        for m in self.layers:
            m.enabled = True


@torch.no_grad()
def merged_state_dict(model):
    """The model's weights with adapters folded in (W + scale B A), under the plain HF names, and the share of the
    merged weights that a bf16 copy would leave where they started (their update below bf16's resolution).

    Each merge runs in fp32 on the CPU, one tensor at a time (no second copy of the model on the device), and
    the merged weights are saved in fp32 whatever the base's dtype: the adapters train in fp32, and with bf16
    base weights an update smaller than half a bf16 step of W (|scale B A| < 0.2-0.4% of |W|, most of them at
    lr 1e-5) would be rounded away, so that the next stage starts from another model than the one trained.
    Loaded in fp32 (`--dtype fp32`, the forgetting measure), the checkpoint computes what the trained model
    computed; loaded in bf16 (`--dtype auto` on CUDA) its merged weights are rounded once more, to within the
    bf16 noise the trained model computed with, and the returned share says how many updates that loses.
    The price: merged projections take 4 bytes a weight on disk and in host memory while saving (7B: ~26 GB)."""
    sd = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if not k.endswith((".A", ".B"))}
    lost = merged = 0
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            w = m.base.weight.float().cpu()
            delta = m.scale * (m.B.float().cpu() @ m.A.float().cpu())
            sd[f"{name}.weight"] = w + delta
            merged += w.numel()
            if m.base.weight.dtype == torch.bfloat16:
                lost += ((sd[f"{name}.weight"].bfloat16().float() == w) & (delta != 0)).sum().item()
    return sd, lost / max(1, merged)


# ---------------------------------------------------------------------------------------------
# Starting a training run, and its checkpoints: an HF folder any stage loads with --model, plus what
# --resume needs (TRY NOT TO MODIFY)
# ---------------------------------------------------------------------------------------------
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
    under full fine-tuning) unless args.keep_optimizer. Under torchrun rank 0 writes (every rank holds the same
    weights and optimizer state)."""
    rank = rank_world()[0]
    keep_optimizer = not final or getattr(args, "keep_optimizer", False)
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
        (weights, lost), optimizer_state = merged_state_dict(model), optimizer.state_dict() if keep_optimizer else None
    if rank > 0:
        return
    if not is_sharded(model) and lost > 0:
        print(
            f"checkpoint step {step}: {100 * lost:.1f}% of the LoRA-merged weights changed by less than half a bf16 "
            "step: saved in fp32 (--dtype fp32 loads them as trained, a bf16 load rounds those changes away)"
        )
    # a sum is finite only if every term is (NaN and Inf carry through it), and is ~10x cheaper than isfinite(w).all();
    # a sum that overflows is looked at element by element
    all_finite = lambda w: torch.isfinite(w.sum()) or torch.isfinite(w).all()
    bad = next((k for k, w in weights.items() if w.is_floating_point() and not all_finite(w)), None)
    if bad:  # the previous checkpoint stays as it was
        fail(f"step {step}: weight {bad} is not finite: no checkpoint written (the one in {folder}, if any, is kept)")
    folder = Path(folder)
    tmp = aside(folder, "tmp")
    remove_checkpoint(tmp)
    model.save_pretrained(tmp / "model", state_dict=weights)
    tok.save_pretrained(tmp / "model")
    adapters = {
        n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad and n.endswith((".A", ".B"))
    }
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
