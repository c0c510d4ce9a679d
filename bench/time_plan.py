"""The time plan of the paper's ALFWorld protocol (`make pipeline MODEL=Qwen/Qwen2.5-7B-Instruct BUDGET=paper`) on
one GPU: each stage's tokens to prefill, decode and train, at support/memory.py RATES (no weights, no download).

    python bench/time_plan.py                 # H200 (141 GB); --kind H100 --card-gb 80 for an H100

Counts are upper bounds: every episode runs to its step limit (the paper's self-play agent fails most games) and
every triplet is kept or scored as the flags say. Two figures are assumptions, printed with the table: the
world-model prompt (384 tokens: ALFWorld's measured with SmolLM2's tokenizer are ~230, bench/README.md) and the
share of triplets the filter keeps (half). Each stage's sampling batch is what the memory plan fits on the card
(memory.memory_plan, as the scripts' own --dry-run does: a group of G or K copies of a prompt is prefilled once,
RWML's held-out scoring runs its distinct prompts G times fewer at once), LoRA r 64 with gradient checkpointing
(Policy RL without, as BUDGET=paper runs it, but on Qwen3-30B-A3B), bf16, eager decoding (lm.sample's default).
RFT is not counted: its sampling is a collection's, its training as long as the episodes it wins.
"""

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory_plan import PAPER_MODELS  # noqa: E402

from support.memory import CARD_BATCH, CARD_SHARE, distinct_prompts, memory_plan, scoring_batch, time_plan  # noqa: E402

# Qwen3-Embedding-8B in bf16 (--embed-dtype auto on CUDA): its weights, and a batch of 64 states of 256 tokens
# (reward.embedder_bytes: 4 h + 3 I values a token, h 4,096, I 12,288)
EMBEDDER = (7.57e9 * 2, 64 * 256 * (4 * 4096 + 3 * 12288) * 2)


def fitted(config, budget, prompt_len, new, start, training, embedder=0, group=1, checkpointing=True):
    """The sampling batch the plan fits in `budget` bytes, halved from `start` (memory.fit_memory's rule); `group`:
    copies of each prompt in a batch, prefilled once; `checkpointing`: the stage's --grad-checkpointing."""
    b = start
    while b > 1:
        plan = memory_plan(
            config, torch.bfloat16, 64, False, checkpointing, 2, prompt_len + new, new, b, prompt_len,
            distinct=distinct_prompts(b, group), training=training, embedder=embedder,
        )  # fmt: skip
        if plan["peak"] <= budget:
            break
        b //= 2
    return b


def sampled(prompts, rows, gb, prompt_len, new, times=1):
    return dict(
        prefill=times * prompts * prompt_len,
        steps=times * math.ceil(rows / gb) * new,
        rows=min(rows, gb),
        context=prompt_len + new,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", default="H200", choices=["H100", "H200"], help="the RATES row")
    p.add_argument("--card-gb", type=float, default=141, help="the card's memory (H200: 141, H100: 80)")
    p.add_argument("--model", default="Qwen/Qwen2.5-7B-Instruct", choices=list(PAPER_MODELS), help="a paper model")
    a = p.parse_args()
    from transformers import AutoConfig

    kind, fields = PAPER_MODELS[a.model]
    config = AutoConfig.for_model(kind, **fields)
    budget = CARD_SHARE * a.card_gb * 1e9
    agent, wm, new = 1536, 384, 256  # prompt tokens a turn: the agent's (the plan's default), the world model's
    episodes, steps = 200 * 3, 30  # collection: 200 training games x 3 episodes, <= 30 steps
    triplets = episodes * steps
    kept = triplets // 2  # the filter keeps half (assumed)
    train, held = kept - kept // 10, kept // 10  # 10% held out
    updates = 2 * math.ceil(train / 32)  # 2 epochs of 32 triplets
    evals = updates // 10 + 1  # held-out scoring every 10 updates and at the start
    G, rl_episodes, rl_steps, rl_updates = 8, 16 * 8, 15, 300  # 300 updates (B.2)
    eval_episodes = (140 + 134) * 3 * 6  # two splits x 3 runs x 6 models, <= 30 steps
    b_agent = fitted(config, budget, agent, new, CARD_BATCH, False)
    b_wm = fitted(config, budget, wm, new, CARD_BATCH, False, EMBEDDER, group=10)  # the filter's K 10 a triplet
    b_rwml = fitted(config, budget, wm, new, 32 * G, True, EMBEDDER, group=G)
    b_score = scoring_batch(config, "bf16", b_rwml, G, wm, new)  # train_wm.py's score_batch
    b_sft = fitted(config, budget, wm, new, CARD_BATCH, True, EMBEDDER)  # WM SFT's held-out scoring
    b_score_eval = fitted(config, budget, wm, new, CARD_BATCH, False, EMBEDDER)  # evaluate.py --wm
    b_rl = fitted(config, budget, agent, new, rl_episodes, True, checkpointing=False)  # BUDGET=paper: none here
    if "30B-A3B" in a.model:  # but on the mixture-of-experts model, whose update leaves no room to sample without
        b_rl = fitted(config, budget, agent, new, rl_episodes, True)
    stages = {
        "collect": {"episodes": sampled(episodes, episodes, b_agent, agent, new, steps)},
        "filter (K 10)": {"filter": sampled(triplets, triplets * 10, b_wm, wm, new)},
        "RWML": {
            "sampling": sampled(32, 32 * G, b_rwml, wm, new, updates),
            "updates": dict(train=updates * 32 * G * (wm + new)),
            "held-out scoring": sampled(held, held, b_score, wm, new, evals),
        },
        "WM SFT": {
            "updates": dict(train=updates * 32 * (wm + new)),
            "held-out scoring": sampled(held, held, b_sft, wm, new, evals),
        },
        "Policy RL x 3": {
            "rollouts": sampled(rl_episodes, rl_episodes, b_rl, agent, new, 3 * rl_updates * rl_steps),
            "updates": dict(train=3 * rl_updates * rl_episodes * rl_steps * (agent + new)),
        },
        "evaluate --wm (3 models)": {"scoring": sampled(3 * held, 3 * held, b_score_eval, wm, new)},
        "evaluate (6 models)": {"episodes": sampled(eval_episodes, eval_episodes, b_agent, agent, new, steps)},
    }
    print(
        f"{a.model} on one {a.kind} ({a.card_gb:g} GB, plan budget {budget / 1e9:.0f} GB), RATES[{a.kind!r}]; "
        f"sampling batches: agent {b_agent}, filter {b_wm}, RWML {b_rwml} (held-out scoring {b_score}), "
        f"Policy RL {b_rl}; "
        f"{triplets} triplets, {kept} kept, {updates} RWML / SFT updates, {evals} held-out scorings of {held}"
    )
    print("| stage | prefill h | decode h | train h | total h |\n|---|---|---|---|---|")
    total = 0
    for stage, phases in stages.items():
        out, t = time_plan(config, torch.bfloat16, phases, 64, True, kind=a.kind, show=False)
        parts = [sum(v[k] for v in out.values()) / 3600 for k in ("prefill", "decode", "train")]
        total += t
        print(f"| {stage} | " + " | ".join(f"{x:.1f}" for x in parts) + f" | {t / 3600:.1f} |")
    print(f"| all | | | | {total / 3600:.1f} |")


if __name__ == "__main__":
    main()
