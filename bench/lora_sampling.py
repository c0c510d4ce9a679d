"""Sampling with LoRA adapters: through them (each projection adds B A x) or folded into the weights for the rollout
(lora.adapters_merged, what RWML and Policy RL do), side by side in one run, bf16 weights and fp32 adapters:

    python bench/lora_sampling.py                 # SmolLM2-135M, LoRA r 8, 4 ALFWorld world-model prompts
    python bench/lora_sampling.py --rank 64 --model Qwen/Qwen2.5-0.5B-Instruct

1. Work per decoding step: aten ops (the CPU's proxy for a GPU's kernel launches, which bound its decoding step)
   and milliseconds, without adapters, through them and merged.
2. What the merged weights sample. Merging rounds W + scale B A to bf16, so an update below half a bf16 step of W
   is lost in the weights. What matters is the distribution: for updates of several sizes (B set so that
   |scale B A| is `rel` of |W|, root mean squares per layer), the KL divergence, per token of the prompts, from the
   exact function (the same bf16 weights and fp32 adapters computed in fp32) of: the model without adapters (how
   far the update moved it), the adapters' path (what a GRPO update's forward computes, bf16 activations) and the
   merged weights.
"""

import argparse
import contextlib
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory_plan import BytesMoved  # noqa: E402
from sample_throughput import alfworld_triplets  # noqa: E402

from reward import wm_prompt  # noqa: E402
from support.lm import TINY_MODEL, cache_arg, chat_prompt, load_model  # noqa: E402
from support.lora import LoRALinear, adapters_merged, adapters_off, add_lora  # noqa: E402
from support.runs import set_seed  # noqa: E402

WAYS = {"no adapters": adapters_off, "through adapters": contextlib.nullcontext, "merged": adapters_merged}


def decode_step(model, ids, way, repeats=5):
    """(aten ops, least ms) of one decoding step after the prompt `ids`, the adapters used `way`."""
    from transformers import DynamicCache

    with torch.no_grad(), WAYS[way](model):
        cache = {cache_arg(model): DynamicCache()}
        model(input_ids=ids[:, :-1], **cache)
        with BytesMoved() as counted:
            model(input_ids=ids[:, -1:], **cache)
        times = []
        for _ in range(repeats):
            cache = {cache_arg(model): DynamicCache()}
            model(input_ids=ids[:, :-1], **cache)
            t0 = time.perf_counter()
            model(input_ids=ids[:, -1:], **cache)
            times.append(time.perf_counter() - t0)
    return counted.ops, 1000 * min(times)


def set_update(model, rel, seed):
    """B random, scaled in each layer so that |scale B A| = rel |W| (root mean squares)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.B.copy_(torch.randn(m.B.shape, generator=g))
                delta = m.scale * m.B @ m.A
                m.B.mul_(rel * m.base.weight.float().pow(2).mean().sqrt() / delta.pow(2).mean().sqrt())


def lost_share(model):
    """|rn_bf16(W + d) - (W + d)| / |d| over all adapted weights: the part of the update the merge rounds away."""
    err = total = 0.0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                exact = m.base.weight.float() + m.scale * m.B @ m.A
                err += (exact.to(m.base.weight.dtype).float() - exact).pow(2).sum().item()
                total += (exact - m.base.weight.float()).pow(2).sum().item()
    return (err / total) ** 0.5


def kl_from_exact(model, batch):
    """Mean per-token KL(exact || each way): `exact` is the same weights and adapters computed in fp32, the function
    the bf16 computations all approximate; "through adapters" is also what the GRPO update's forward computes."""
    mask = batch["attention_mask"].bool()
    logp = lambda m: torch.log_softmax(m(**batch).logits.float(), -1)[mask]
    with torch.no_grad():
        exact = logp(copy.deepcopy(model).float())
        out = {}
        for way, ctx in WAYS.items():
            with ctx(model):
                out[way] = (exact.exp() * (exact - logp(model))).sum(-1).mean().item()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=TINY_MODEL)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--rel", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 3e-2])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    set_seed(a.seed)
    model, tok = load_model(a.model, device="cpu", dtype="bf16")
    add_lora(model, a.rank)
    texts = [chat_prompt(tok, wm_prompt(t, True)) for t in alfworld_triplets(a.prompts, a.seed)]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    set_update(model, 1e-2, a.seed)
    decode_step(model, batch["input_ids"][:1], "no adapters")  # first calls pay one-time costs: untimed
    steps = {way: decode_step(model, batch["input_ids"][:1], way) for way in WAYS}
    plain = steps["no adapters"]
    print(f"{a.model}, bf16, LoRA r {a.rank}: one decoding step after a {batch['input_ids'].shape[1]}-token prompt\n")
    print("| way | aten ops | ops / no adapters | ms (least of 5) | ms / no adapters |\n|---|---|---|---|---|")
    for way, (ops, ms) in steps.items():
        print(f"| {way} | {ops} | {ops / plain[0]:.2f} | {ms:.1f} | {ms / plain[1]:.2f} |")
    tokens = int(batch["attention_mask"].sum())
    print(f"\nKL from the exact (fp32) function, mean over {tokens} prompt tokens of {len(texts)} prompts\n")
    print("| update / W | update lost in merged bf16 weights | no adapters | through adapters (update's) | merged |")
    print("|---|---|---|---|---|")
    for rel in a.rel:
        set_update(model, rel, a.seed)
        kl = kl_from_exact(model, batch)
        cells = " | ".join(f"{kl[w]:.2e}" for w in WAYS)
        print(f"| {rel:g} | {lost_share(model):.2f} | {cells} |")


if __name__ == "__main__":
    main()
