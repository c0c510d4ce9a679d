"""GRPO (Shao et al., 2024) written by hand: how RWML trains its world model (paper Sec. 2.2) and how policy
learning trains the agent (Sec. 3.1). For G samples o_1..o_G of one prompt with rewards r_1..r_G:

    A_i     = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)                 group advantage   group_advantages
    rho_i,t = pi_theta(o_i,t | prompt, o_i,<t) / pi_old(o_i,t | ...)         probability ratio grpo_loss
    L_i,t   = min(rho_i,t A_i, clip(rho_i,t, 1 - eps, 1 + eps) A_i) - beta KL_i,t                 grpo_loss
    KL_i,t  = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1                  k3 estimator      grpo_loss
    loss    = - sum_i,t L_i,t / (completion tokens in the batch)              token mean        grpo_update
              (--seq-mean: each sequence's mean, then the mean over sequences, the GRPO paper's form)

pi_old is the policy that sampled (the weights before the update), pi_ref the starting policy. This file is
the algorithm only (ALGO LOGIC), with WM SFT's and RFT's supervised step beside it. The harness sits in support/:
training.py (flags, the start of a run, checkpoints), lora.py (hand-written LoRA), lm.py (models, sampling),
distributed.py (torchrun), memory.py (the memory plan).
"""

import torch

from support.distributed import micro_batches, rank_mean
from support.lm import token_logprobs
from support.lora import adapters_off, has_adapters
from support.training import optimizer_step


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC: GRPO's advantages, log-probabilities, loss and update; the supervised step
# ---------------------------------------------------------------------------------------------
def group_advantages(rewards, group_size, eps=1e-4):
    """Rewards of consecutive groups of G samples of one prompt -> advantages, and the number of groups
    whose rewards are all equal (their advantages are 0: no learning signal)."""
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)
    # ---- EXERCISE 3: group-normalised advantages (paper Sec. 2.2) ----
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
    # log pi(token) = logit(token) - logsumexp(logits): of the taken token alone, one row at a time (support/lm.py)
    logp = token_logprobs(logits, ids[:, P:])
    entropy = None
    if with_entropy:  # a diagnostic, outside the autograd graph, one row at a time (no [B, C, vocab] temporaries)
        with torch.no_grad():
            entropy = torch.stack([-(row.softmax(-1) * row.log_softmax(-1)).sum(-1) for row in logits])
    return logp, entropy


def grpo_loss(logp, old_logp, ref_logp, adv, mask, clip_eps, beta, norm):
    """Sum over this micro-batch of the GRPO per-token loss, divided by `norm` (see `grpo_update`)."""
    # ---- EXERCISE 4: the clipped surrogate (paper Sec. 2.2) ----
    # Eq. GRPO clipped surrogate: min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = pi / pi_old per token
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * adv[:, None], ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv[:, None])
    # ---- END EXERCISE 4 ----
    kl = torch.zeros_like(logp)  # no reference policy (beta = 0): no KL term
    if ref_logp is not None:
        # ---- EXERCISE 5: the k3 KL to the reference policy (paper Sec. 2.2) ----
        # Eq. KL to the reference, k3 estimator (http://joschu.net/blog/kl-approx.html): per token, with
        # r = pi_ref / pi: r - log r - 1 (non-negative, and its mean under pi is KL(pi || pi_ref))
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
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
    adv = torch.as_tensor(adv, dtype=torch.float32)
    lengths = torch.tensor([max(1, len(c)) for _, c in seqs], dtype=torch.float32)
    tokens, n_seqs = rank_mean(lengths.sum().item(), len(seqs))  # the batch's, / the ranks (DDP: its docstring)
    # ---- EXERCISE 6: the loss normalisation (paper Sec. 2.2) ----
    # Eq. loss normalisation: token mean (every completion token of the batch weighs the same) or sequence mean
    # (each sequence's tokens sum to one, then the mean over the batch's sequences)
    norm = torch.full_like(lengths, tokens) if args.token_mean else lengths * n_seqs
    # ---- END EXERCISE 6 ----
    old, ref, T = {}, {}, getattr(args, "temperature", 1.0)
    stats = dict(loss=0.0, kl=0.0, clipfrac=0.0, entropy=0.0)
    skipped = 0
    model.train()
    for epoch in range(args.ppo_epochs):
        epoch_loss = 0.0
        first_ref = ref_model if epoch == 0 and args.beta > 0 else None  # (its pass, also of a rank without data)
        for k, (idx, net) in enumerate(micro_batches(model, len(seqs), args.micro_batch, first_ref)):
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
                stats["loss"] += loss.item()
                stats["kl"] += s["kl"] / tokens
                stats["clipfrac"] += s["clipfrac"] / tokens
        grad_norm, skip = optimizer_step(model, optimizer, epoch_loss, args.max_grad_norm)  # no step on NaN / Inf
        skipped += skip
    model.eval()
    return dict(zip(stats, rank_mean(*stats.values())), grad_norm=grad_norm, skipped=skipped)


def sft_update(model, optimizer, seqs, args):
    """One supervised step, WM SFT's (train_wm.py) and RFT's (train_policy.py --method rft): mean cross-entropy
    over all target tokens of the batch (under torchrun: of all ranks' batches)."""
    device = next(model.parameters()).device
    tokens = rank_mean(sum(len(c) for _, c in seqs))[0]  # the batch's target tokens, / the ranks
    model.train()
    total = 0.0
    for idx, net in micro_batches(model, len(seqs), args.micro_batch):
        ids, attn, P = collate([seqs[i] for i in idx], device)
        logp, _ = completion_logprobs(net, ids, attn, P)
        # Eq. SFT: -1/|y| sum_t log pi(y_t | y_<t, prompt), |y| the batch's target tokens, not each sequence's: every
        # token weighs the same (as GRPO's token mean), so a long next state counts more than a short one
        loss = -(logp * attn[:, P:]).sum() / tokens
        loss.backward()
        total += loss.item()
    grad_norm, skipped = optimizer_step(model, optimizer, total, args.max_grad_norm)  # no step on NaN / Inf
    model.eval()
    return dict(loss=rank_mean(total)[0], grad_norm=grad_norm, skipped=int(skipped))


@torch.no_grad()
def reference_logprobs(model, ref_model, ids, attn, P, temperature=1.0):
    """log pi_ref of the completion tokens: the base weights (adapters off) under LoRA, else the frozen copy."""
    if has_adapters(model):
        with adapters_off(model):
            return completion_logprobs(model, ids, attn, P, temperature=temperature)[0]
    return completion_logprobs(ref_model, ids, attn, P, temperature=temperature)[0]
