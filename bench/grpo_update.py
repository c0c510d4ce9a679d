"""One GRPO update (generation + scoring + loss + optimizer step) of grpo.py against TRL's GRPOTrainer
on the same model, prompts, G, batch, completion length, beta and reward, in one run, both with gradient
checkpointing (GRPOConfig's default; --grad-checkpointing in our scripts); plus the peak memory of each,
measured in its own process (CUDA: torch.cuda.max_memory_allocated; CPU: max RSS), and completion tokens
sampled per second of update.

    pip install trl==1.13.0          # bench-only dependency (the version measured in bench/README.md)
    python bench/grpo_update.py      # goal: time ratio ours / TRL <= 1.0
    python bench/grpo_update.py --model Qwen/Qwen2.5-0.5B-Instruct --group-size 8 --max-new-tokens 256   # on a GPU
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ["Say the word apple.", "Name a fruit.", "What is the capital of France?", "Describe a kitchen in one line."]


def reward(texts):
    return [float("apple" in t.lower()) + 0.1 * min(len(t), 20) / 20 for t in texts]


def ours(a):
    import torch

    from grpo import group_advantages, grpo_update
    from support.lm import chat_prompt, checkpoint_activations, load_model, sample
    from support.runs import set_seed

    set_seed(a.seed)
    model, tok = load_model(a.model)
    ref = __import__("copy").deepcopy(model).requires_grad_(False)
    if a.grad_checkpointing:
        checkpoint_activations(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    args = argparse.Namespace(
        micro_batch=len(PROMPTS) * a.group_size,
        ppo_epochs=1,
        clip_eps=0.2,
        beta=a.beta,
        max_grad_norm=1.0,
        token_mean=True,
    )
    prompts = [chat_prompt(tok, p) for p in PROMPTS for _ in range(a.group_size)]
    times, tokens = [], []
    for _ in range(a.steps):
        t0 = time.time()
        samples = sample(model, tok, prompts, a.max_new_tokens, 1.0)
        adv, _ = group_advantages(reward([t for _, _, t in samples]), a.group_size)
        grpo_update(model, opt, [(p, c) for p, c, _ in samples], adv, args, ref)
        times.append(time.time() - t0)
        tokens.append(sum(len(c) for _, c, _ in samples))
    return times, tokens


def trl(a):
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from support.lm import resolve_model

    class Timer(TrainerCallback):
        times, tokens = [], []

        def on_step_begin(self, *args, **kw):
            self.t0 = time.time()

        def on_step_end(self, *args, **kw):
            self.times.append(time.time() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.tokens.append(logs["completions/mean_length"] * len(PROMPTS) * a.group_size)

    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS] * a.steps})
    config = GRPOConfig(
        output_dir="/tmp/trl_bench",
        per_device_train_batch_size=len(PROMPTS) * a.group_size,
        num_generations=a.group_size,
        max_completion_length=a.max_new_tokens,
        beta=a.beta,
        learning_rate=1e-6,
        max_steps=a.steps,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=a.seed,
        bf16=torch.cuda.is_available(),
        max_grad_norm=1.0,
        temperature=1.0,
        gradient_checkpointing=a.grad_checkpointing,
    )
    trainer = GRPOTrainer(
        model=resolve_model(a.model),
        reward_funcs=lambda completions, **kw: reward([c[0]["content"] for c in completions]),
        args=config,
        train_dataset=data,
        callbacks=[Timer()],
    )
    trainer.train()
    return Timer.times, Timer.tokens


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.001)
    p.add_argument("--steps", type=int, default=3, help="updates; the median of all but the first is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True, help="both sides (TRL's default)"
    )
    p.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:  # a child process: one side, its step times, tokens and peak memory as JSON
        import torch

        times, tokens = (ours if a.side == "ours" else trl)(a)
        peak = (
            torch.cuda.max_memory_allocated() / 2**20
            if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        print(json.dumps(dict(times=times, tokens=tokens, peak_mb=peak)))
        raise SystemExit
    res = {}
    for side in ("ours", "trl"):
        out = subprocess.run([sys.executable, __file__, "--side", side, *sys.argv[1:]], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"error: the {side} side failed:\n{out.stderr[-2000:]}")
        res[side] = json.loads(out.stdout.strip().splitlines()[-1])
        step = statistics.median(res[side]["times"][1:] or res[side]["times"])
        res[side]["step"] = step
        rate = (
            sum(res[side]["tokens"]) / sum(res[side]["times"][: len(res[side]["tokens"])])
            if res[side]["tokens"]
            else float("nan")
        )
        print(
            f"{side:>4}: update {step:.2f} s (steps {[round(t, 2) for t in res[side]['times']]}), "
            f"{rate:.0f} sampled tokens/s, peak memory {res[side]['peak_mb']:.0f} MB"
        )
    print(
        f"time ours / TRL: {res['ours']['step'] / res['trl']['step']:.2f} (goal <= 1.0); "
        f"peak memory ours / TRL: {res['ours']['peak_mb'] / res['trl']['peak_mb']:.2f}"
    )
