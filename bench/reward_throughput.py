"""Sim-to-real reward throughput: (predicted, real) next-state pairs scored per second, on real ALFWorld
next states, with a cold cache (every real next state new) and a warm one (real states seen before,
as in GRPO where G predictions share one real next state).

    python bench/reward_throughput.py --triplets runs/pipeline/collect/triplets.jsonl   # goal >= 2,000 pairs/s on CPU
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reward import DEFAULT_EMBEDDER, Embeddings, sim_to_real  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--triplets", required=True, help="a triplets.jsonl from collect.py")
p.add_argument("--pairs", type=int, default=4096)
p.add_argument("--group-size", type=int, default=8, help="predictions per real next state in the warm run")
p.add_argument("--embedder", default=DEFAULT_EMBEDDER)
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()

states = sorted({json.loads(l)["next_state"] for l in open(a.triplets)})
rng = random.Random(a.seed)
real = [rng.choice(states) for _ in range(a.pairs)]
# every prediction distinct, as sampled predictions are
outputs = [f"<think>...</think><next_state>{rng.choice(states)} ({i})</next_state>" for i in range(a.pairs)]
rates, rewards = {}, {}
for dtype in ("fp32", "bf16"):
    embed = Embeddings(a.embedder, dtype=dtype)
    sim_to_real(outputs[:64], real[:64], embed, 0.2)  # warm-up
    for name, reals in (
        ("cold", real),
        ("grouped", [r for r in real[: a.pairs // a.group_size] for _ in range(a.group_size)]),
    ):
        embed.cache.clear()
        t0 = time.time()
        recs = sim_to_real(outputs, reals, embed, 0.2)
        rates[dtype, name] = a.pairs / (time.time() - t0)
        rewards[dtype, name] = [r["reward"] for r in recs]
        print(
            f"{dtype} {name:>8}: {rates[dtype, name]:,.0f} pairs/s ({a.pairs} pairs, "
            f"{len(states)} distinct real states)"
        )
flips = sum(x != y for x, y in zip(rewards["fp32", "cold"], rewards["bf16", "cold"]))
print(
    f"bf16 / fp32 speed: {rates['bf16', 'cold'] / rates['fp32', 'cold']:.2f}x; "
    f"rewards that differ: {flips} of {a.pairs}; "
    f"goal >= 2,000 pairs/s"
)
