"""Environment steps per second of collect.py: B games stepped together with one batched `generate`
per turn, against one game at a time, with the same model, games, steps and seed, in one run.

    python bench/collect_throughput.py            # goal: ratio >= 4x at B=8
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from collect import collect, parse_args  # noqa: E402
from support.lm import load_model  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--games", type=int, default=8, help="valid_unseen games, each played once")
p.add_argument("--batch-games", type=int, default=8, help="B of the batched run")
p.add_argument("--max-steps", type=int, default=4)
p.add_argument("--max-new-tokens", type=int, default=64)
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()

model, tok = load_model(a.model)
rates = {}
for b in (a.batch_games, 1):
    with tempfile.TemporaryDirectory() as out:
        args = parse_args(
            [
                "--split",
                "valid_unseen",
                "--games",
                str(a.games),
                "--episodes",
                "1",
                "--model",
                a.model,
                "--max-steps",
                str(a.max_steps),
                "--max-new-tokens",
                str(a.max_new_tokens),
                "--batch-games",
                str(b),
                "--seed",
                str(a.seed),
                "--out",
                out,
            ]
        )
        t0 = time.time()
        rollouts = collect(args, model, tok, desc=f"B={b}")
        seconds = time.time() - t0
    steps = sum(r["steps"] for r in rollouts)
    rates[b] = steps / seconds
    print(f"B={b}: {steps} env steps in {seconds:.1f} s = {rates[b]:.2f} steps/s")
print(f"batched / one-at-a-time: {rates[a.batch_games] / rates[1]:.2f}x (goal >= 4x)")
