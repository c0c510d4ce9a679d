"""Group sampling with and without the shared prefill (lm.sample, share=True / False), side by side in one
run: real world-model prompts, each sampled G times, as RWML, the filter and Policy RL's first turn do.

    python bench/sample_throughput.py                      # ALFWorld, τ² mock and retail; G = 4, 8, 16
    python bench/sample_throughput.py --sets alfworld --groups 8

Both paths sample the same rows with the same seed and write exactly --max-new-tokens tokens a row (the
end-of-sequence token is switched off), so they do the same decoding and differ only in the prefill:
the plain path runs every copy of a prompt through the model, the shared path each distinct prompt once.
Goal on 2 CPU cores: >= 2x completions/s at G = 8 on ALFWorld prompts, more on τ²'s longer ones.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reward import wm_prompt  # noqa: E402
from support.lm import chat_prompt, load_model, sample  # noqa: E402
from support.runs import read_jsonl, set_seed  # noqa: E402

TAU2_ACTION = "Hello! Could you give me your name and tell me what I can help you with today?"


def alfworld_triplets(n, seed):
    """n world-model triplets from real ALFWorld training games (random admissible actions)."""
    from collect import collect
    from collect import parse_args as collect_args

    out = tempfile.mkdtemp(prefix="bench_sample_")
    flags = ["--policy", "random", "--split", "train", "--games", str(n), "--episodes", "1", "--max-steps", "8"]
    collect(collect_args([*flags, "--seed", str(seed), "--out", out]))
    last = {t["game"]: t for t in read_jsonl(os.path.join(out, "triplets.jsonl"))}
    return list(last.values())  # each game's last turn: a full window of H past turns, as most RWML prompts


def tau2_triplets(domain, n):
    """n world-model inputs of a τ² domain: its first tasks' opening states and an agent's first message."""
    from support.tau2_env import list_tasks, start_tau2, wm_state

    out = []
    for name in list_tasks([domain], "test" if domain != "mock" else None, n):
        ep = start_tau2(name, "test", 0, seed=0, user_model="local")
        out.append(dict(env="tau2", state=wm_state(domain, ep.task, ep.messages), action=TAU2_ACTION))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sets", nargs="+", default=["alfworld", "mock", "retail"], help="alfworld and/or τ² domains")
    p.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16], help="G: samples per prompt")
    p.add_argument("--prompts", type=int, default=4, help="distinct ALFWorld prompts (τ²: 1, they are long)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    model, tok = load_model(a.model)
    model.generation_config.eos_token_id = None  # every row writes --max-new-tokens: equal decoding both ways
    print(f"{a.model} on {model.device}, {a.max_new_tokens} new tokens a row")
    print("| prompts | tokens a prompt | G | rows | path | prefill tokens | s | completions/s | shared / plain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in a.sets:
        triplets = alfworld_triplets(a.prompts, a.seed) if name == "alfworld" else tau2_triplets(name, 1)
        prompts = [chat_prompt(tok, wm_prompt(t)) for t in triplets]
        width = max(len(tok(q, add_special_tokens=False)["input_ids"]) for q in prompts)  # left-padded length
        for G in a.groups:
            rate = {}
            for share in (False, True):
                set_seed(a.seed)
                t0 = time.time()
                out = sample(model, tok, prompts, a.max_new_tokens, temperature=1.0, n=G, share=share)
                seconds = time.time() - t0
                rate[share] = len(out) / seconds
                prefill = width * len(prompts) * (1 if share else G)
                ratio = f"{rate[True] / rate[False]:.2f}x" if share else ""
                print(
                    f"| {name} x {len(prompts)} | {width} | {G} | {len(out)} | {'shared' if share else 'plain'} | "
                    f"{prefill} | {seconds:.1f} | {rate[share]:.2f} | {ratio} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
