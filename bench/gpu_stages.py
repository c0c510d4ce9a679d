"""Every stage script end to end on one device, small: what a GPU run of the pipeline executes, in minutes.

    python bench/gpu_stages.py                        # on a GPU (make gpu-stages); one table, < 10 min meant
    python bench/gpu_stages.py --device cpu           # the same on CPU (CUDA hidden from every stage)
    python bench/gpu_stages.py --device cpu --stages collect,warmup,rwml   # a few stages (tests/test_bench.py)

A model of the Qwen2 architecture (Qwen2.5-7B-Instruct's family) at toy width, random weights, saved into a
folder with a tokenizer (--tokenizer; default the tiny model's, SmolLM2's ChatML template), so every stage loads
it with --model FOLDER as it would a checkpoint: nothing is downloaded (it runs on a machine without network).
Then, each stage a subprocess of this python, flags small (2 games, 1-2 updates, 16 new tokens), the layout of
`make experiment` (support/report.py) so that the report can be written:

Rewards are scored by a random tiny embedder built here too (--embedder all-minilm-l6-v2: the real default,
whose package is 88 MB, where it is installed).

  collect, heldout      collect.py: ALFWorld train games played by the model; held-out games by a random policy
  warmup                train_wm.py --mode sft: WM SFT (LoRA, bf16, gradient checkpointing)
  filter                train_wm.py --mode filter: the easy-triplet filter
  rwml, wm_sft          train_wm.py --mode rwml / sft from the warm-up checkpoint, 2 updates
  resume                the RWML run stopped after 1 update, then --resume for the 2nd: must equal `rwml`
  torchrun              one RWML update as one rank of torchrun (a process group: NCCL on CUDA, gloo on CPU)
  forgetting            evaluate.py --forgetting: weights changed, KL and perplexity against the warm-up
  policy_rl             train_policy.py: one Policy RL update (LoRA, bf16, gradient checkpointing)
  wm_eval, eval         evaluate.py --wm (held-out world-model scores), evaluate.py (success on valid_seen/unseen)
  report                evaluate.py --report

Every stage decodes eagerly (RWML_COMPILE_DECODING=off, lm.sample's default) except `wm_eval`, which runs the
compiled path (=on: inductor compiles the toy model once, ~1 min) so that the chain checks it end to end without
compiling in every stage (CPU: off there too, inductor would take minutes).

Prints one row a stage: seconds, exit status, and the peak GPU memory its metrics.jsonl recorded (`peak_gb`,
train_wm.py / train_policy.py on CUDA); exits 1 if any stage fails (its log's tail is printed; every log stays
in --out/logs). Random weights never write an end-of-sequence token: every completion runs to its limit.
"""

import argparse
import json
import math
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Qwen2.5-7B-Instruct's architecture (Qwen2: biased q/k/v projections, grouped-query attention, SwiGLU, RMSNorm,
# rope theta 1e6) at toy width; the vocabulary is the tokenizer's
QWEN2 = dict(
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=8192,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
CKPT = "checkpoint/model"
COMPILED_STAGE = "wm_eval"  # the one stage that decodes on the compiled path (on CUDA)
# what the model learns to write before any stage runs (teach_format): the WM SFT target of an invalid action,
# which is what a random model's actions in ALFWorld are
FORMAT = "<think> </think><next_state>Nothing happens.</next_state>"
LORA = ["--lora-rank", "8", "--dtype", "bf16", "--grad-checkpointing", "--micro-batch", "2"]
NEW = ["--max-new-tokens", "24"]  # FORMAT is 18 of the tiny model's tokens
STAGES = (
    "collect",
    "heldout",
    "warmup",
    "filter",
    "rwml",
    "resume",
    "torchrun",
    "wm_sft",
    "forgetting",
    "policy_rl",
    "wm_eval",
    "eval",
    "report",
)


def build_model(folder, tokenizer, seed):
    """A random-init Qwen2 model of QWEN2's shape, saved in bf16 with `tokenizer` into `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from support.lm import load_tokenizer

    tok = load_tokenizer(tokenizer)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=64 * math.ceil(len(tok) / 64),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **QWEN2,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    steps, nll = teach_format(model, tok)
    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters()), steps, nll


def build_embedder(folder, tokenizer, seed):
    """A random-init sentence-transformers embedder (a 1-layer BERT of width 64 over `tokenizer`, mean-pooled)
    saved into `folder`: the reward's code path without the 88 MB package of the default embedder. Its cosines
    mean nothing (random BERTs put every text near every other): the rewards that vary are the format's."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    from support.lm import load_tokenizer

    tok = load_tokenizer(tokenizer)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64 * math.ceil(len(tok) / 64),
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
    )
    BertModel(config).save_pretrained(f"{folder}_hf")
    tok.save_pretrained(f"{folder}_hf")
    word = models.Transformer(f"{folder}_hf", max_seq_length=512)
    SentenceTransformer(modules=[word, models.Pooling(config.hidden_size, "mean")], device="cpu").save(str(folder))


def teach_format(model, tok, target_nll=0.7, max_steps=300):
    """A few AdamW steps (fp32, in this process) so that after any chat prompt the model writes FORMAT with
    probability about exp(-target_nll) = 1/2: RWML's groups then hold both rewards (a random model writes no
    <next_state> tag, every reward is 0 and no update changes a weight), and the resume check compares real
    updates. Prompts: the project's general prompts, each also padded with a repeated ALFWorld-like room to
    the length of a world-model prompt. (steps taken, the target's last mean NLL in nats)"""
    import torch

    from support.lm import chat_prompt

    general = [json.loads(x)["prompt"] for x in (ROOT / "data" / "general_prompts.jsonl").read_text().splitlines()]
    room = " You see a cabinet 3, a countertop 1, a drawer 2 and a fridge 1." * 12
    target = tok(FORMAT, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    step, loss = 0, torch.tensor(math.inf)
    while step < max_steps:
        step += 1
        pick = torch.randint(len(general), (4,), generator=g).tolist()
        texts = [general[i] + (room if j % 2 else "") for j, i in enumerate(pick)]
        prompts = [tok(chat_prompt(tok, t), add_special_tokens=False)["input_ids"] for t in texts]
        nlls = []
        for ids in prompts:  # one sequence a pass: no padding to get right
            x = torch.tensor([ids + target])
            logits = model(x, logits_to_keep=len(target) + 1).logits[0, :-1].float()
            nlls.append(torch.nn.functional.cross_entropy(logits, x[0, len(ids) :], reduction="sum"))
        loss = torch.stack(nlls).mean()
        if loss.item() < target_nll:
            break
        opt.zero_grad()
        (loss / len(target)).backward()
        opt.step()
    model.eval()
    return step, loss.item()


def stage_commands(out, model, embedder):
    """{stage: [argv, ...]}: the commands of each stage, in order (`resume` has two)."""
    py = [sys.executable]
    embed = ["--embedder", embedder]
    start = f"{out}/warmup/{CKPT}"
    heldout = ["--heldout", f"{out}/heldout/triplets.jsonl"]
    arm = [*LORA, *NEW, *heldout, *embed, "--batch-size", "2", "--eval-every", "1", "--save-every", "1"]
    arm += ["--no-start-eval"]
    rwml = [
        "train_wm.py",
        "--mode",
        "rwml",
        "--model",
        start,
        "--triplets",
        f"{out}/filter/triplets.filtered.jsonl",
        "--group-size",
        "4",
        *arm,
    ]
    play = ["--max-steps", "2", *NEW]
    return {
        "collect": [
            py
            + ["collect.py", "--model", model, "--dtype", "bf16", "--split", "train", "--games", "2", "--episodes", "1"]
            + ["--max-steps", "3", *NEW, "--out", f"{out}/collect"]
        ],
        "heldout": [
            py
            + ["collect.py", "--policy", "random", "--split", "train", "--first-game", "2", "--games", "2"]
            + ["--episodes", "1", "--max-steps", "2", "--out", f"{out}/heldout"]
        ],
        "warmup": [
            py
            + ["train_wm.py", "--mode", "sft", "--model", model, "--triplets", f"{out}/collect/triplets.jsonl", *arm]
            + ["--max-steps", "2", "--out", f"{out}/warmup"]
        ],
        "filter": [
            py
            + ["train_wm.py", "--mode", "filter", "--model", start, "--triplets", f"{out}/collect/triplets.jsonl"]
            + ["--filter-k", "2", "--tau-easy", "2", "--dtype", "bf16", *NEW, *embed, "--out", f"{out}/filter"]
        ],
        "rwml": [py + rwml + ["--max-steps", "2", "--out", f"{out}/arms/rwml_s0"]],
        "resume": [  # stopped after update 1 (its checkpoint written), then resumed for update 2
            py + rwml + ["--max-steps", "1", "--out", f"{out}/resume"],
            py + rwml + ["--max-steps", "2", "--resume", "--out", f"{out}/resume"],
        ],
        "torchrun": [
            py
            + ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", __file__, "--rank"]
            + rwml
            + ["--max-steps", "1", "--out", f"{out}/torchrun"]
        ],
        "wm_sft": [
            py
            + ["train_wm.py", "--mode", "sft", "--model", start, "--triplets", f"{out}/filter/triplets.filtered.jsonl"]
            + [*arm, "--max-steps", "2", "--out", f"{out}/arms/wm_sft_s0"]
        ],
        "forgetting": [
            py
            + ["evaluate.py", "--forgetting", start, "--prompts", f"{out}/prompts.jsonl", "--dtype", "bf16"]
            + ["--out", f"{out}/forgetting", "--model", f"rwml_s0={out}/arms/rwml_s0/{CKPT}"]
            + [f"wm_sft_s0={out}/arms/wm_sft_s0/{CKPT}"]
        ],
        "policy_rl": [
            py
            + ["train_policy.py", "--model", model, *LORA, "--games", "2", "--games-per-step", "1"]
            + ["--group-size", "2", "--updates", "1", *play, "--out", f"{out}/policy_rl"]
        ],
        "wm_eval": [
            py
            + ["evaluate.py", "--wm", f"{out}/heldout/triplets.jsonl", "--val-size", "2", "--dtype", "bf16", *NEW]
            + embed
            + ["--out", f"{out}/wm_eval", "--model", f"Base={model}", f"RWML={out}/arms/rwml_s0/{CKPT}"]
        ],
        "eval": [
            py
            + ["evaluate.py", "--games", "1", "--runs", "1", *play, "--dtype", "bf16", "--out", f"{out}/eval"]
            + ["--model", f"Base={model}", f"RWML={out}/arms/rwml_s0/{CKPT}", f"Policy RL={out}/policy_rl/{CKPT}"]
        ],
        "report": [py + ["evaluate.py", "--report", str(out)]],
    }


def stage_args(argv):
    """(script, its parsed args) of one stage command, parsed by the stage script's own parse_args (no model
    loads, no run): a flag the script no longer takes fails here (tests/test_bench.py), not on a GPU."""
    import importlib

    i = next(i for i, x in enumerate(argv) if x in ("collect.py", "train_wm.py", "train_policy.py", "evaluate.py"))
    return argv[i], importlib.import_module(argv[i].removesuffix(".py")).parse_args(argv[i + 1 :])


def peak_gb(out, stage):
    """The most any metrics.jsonl row of the stage's run folder recorded under a `peak_*` key, or None."""
    folder = {"rwml": "arms/rwml_s0", "wm_sft": "arms/wm_sft_s0"}.get(stage, stage)
    path = Path(out) / folder / "metrics.jsonl"
    if not path.exists():
        return None
    peaks = [
        v
        for line in path.read_text().splitlines()
        if line.strip()
        for k, v in json.loads(line).items()
        if k.startswith("peak_")
    ]
    return max(peaks) if peaks else None


def same_run(a, b):
    """Where two RWML runs differ: their metrics rows (every number but time and memory) and their checkpoints'
    weights. ([differences], largest |weight difference|)"""
    from safetensors.torch import load_file

    rows = [[json.loads(x) for x in (Path(f) / "metrics.jsonl").read_text().splitlines() if x.strip()] for f in (a, b)]
    diffs = [] if len(rows[0]) == len(rows[1]) else [f"{len(rows[0])} metrics rows against {len(rows[1])}"]
    for ra, rb in zip(*rows):
        for k in sorted(set(ra) | set(rb)):
            if k == "seconds" or k.startswith("peak_"):
                continue
            va, vb = ra.get(k), rb.get(k)
            num = isinstance(va, (int, float)) and isinstance(vb, (int, float))
            if not (math.isclose(va, vb, rel_tol=1e-4, abs_tol=1e-6) if num else va == vb):
                diffs.append(f"step {ra.get('step')} {k}: {va} against {vb}")
    wa, wb = (load_file(str(Path(f) / CKPT / "model.safetensors")) for f in (a, b))
    if wa.keys() != wb.keys():
        return diffs + ["the checkpoints hold different tensors"], math.inf
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    scale = max(wa[k].float().abs().max().item() for k in wa)
    if worst > 1e-3 * scale:
        diffs.append(f"weights differ by up to {worst:.3g} (largest weight {scale:.3g})")
    return diffs, worst


def run_as_rank(argv):
    """`torchrun ... gpu_stages.py --rank SCRIPT ARG ...`: this rank's process group (NCCL on CUDA, gloo on CPU),
    made here because the stage scripts make none at world size 1, then SCRIPT as its `__main__`."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    print(f"process group: {dist.get_backend()}, rank {dist.get_rank()} of {dist.get_world_size()}", flush=True)
    os.chdir(ROOT)
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    finally:
        if dist.is_initialized():  # a stage that tears its group down itself leaves nothing to do
            dist.destroy_process_group()


def main():
    if sys.argv[1:2] == ["--rank"]:
        return run_as_rank(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: CUDA hidden from every stage")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, in this order: {','.join(STAGES)}")
    p.add_argument("--tokenizer", default="smollm2-135m", help="HF id or folder whose tokenizer the model gets")
    p.add_argument(
        "--embedder",
        default="random",
        help="the reward's embedder: random (a tiny random one built here) or a sentence-transformers id/folder",
    )
    p.add_argument("--out", default=None, help="folder of every stage's run (default: a temporary one, removed)")
    p.add_argument("--stage-timeout", type=int, default=600, help="seconds one stage may take")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    a = p.parse_args()
    stages = a.stages.split(",")
    if any(s not in STAGES for s in stages):
        raise SystemExit(f"error: --stages {a.stages}: each one of {','.join(STAGES)}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", RWML_COMPILE_DECODING="off")
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the stage scripts pick CUDA whenever they see it
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device here (run with --device cpu to check the script on CPU)")
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    os.environ.update(env)  # this process too: building the model needs no device
    out = Path(a.out or tempfile.mkdtemp(prefix="gpu_stages_")).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    n, steps, nll = build_model(out / "model", a.tokenizer, a.seed)
    # the forgetting stage's general prompts: the first 8 of the project's
    general = (ROOT / "data" / "general_prompts.jsonl").read_text().splitlines()[:8]
    (out / "prompts.jsonl").write_text("\n".join(general) + "\n")
    print(
        f"model: Qwen2, {n / 1e6:.1f}M parameters, random weights taught the format in {steps} steps "
        f"(P(format) = {math.exp(-nll):.2f}), bf16, {time.time() - t0:.1f} s -> {out}/model"
    )

    rows, failed = [], None
    embedder = a.embedder
    if embedder == "random":
        embedder = str(out / "embedder")
        build_embedder(embedder, a.tokenizer, a.seed)
    commands = stage_commands(out, str(out / "model"), embedder)
    for stage in stages:
        t = time.time()
        rc, log = 0, out / "logs" / f"{stage}.log"
        with open(log, "w") as f:
            for argv in commands[stage]:
                try:
                    compiled = stage == COMPILED_STAGE and a.device == "cuda"
                    rc = subprocess.run(
                        argv,
                        cwd=ROOT,
                        env=dict(env, RWML_COMPILE_DECODING="on") if compiled else env,
                        stdout=f,
                        stderr=subprocess.STDOUT,
                        timeout=a.stage_timeout,
                    ).returncode
                except subprocess.TimeoutExpired:
                    rc = 124
                if rc:
                    break
            if stage == "resume" and rc == 0:  # the resumed run equals the uninterrupted one
                diffs, worst = same_run(out / "arms" / "rwml_s0", out / "resume")
                print(f"resume against uninterrupted: largest weight difference {worst:.3g}", file=f)
                print("\n".join(diffs), file=f)
                rc = 1 if diffs else 0
                note = f"equals the uninterrupted run (weights within {worst:.2g})" if not diffs else diffs[0]
            elif stage == "torchrun" and rc == 0:
                note = next((x for x in log.read_text().splitlines() if x.startswith("process group")), "")
            else:
                note = ""
        peak = peak_gb(out, stage)
        rows.append((stage, time.time() - t, rc, peak, note))
        if rc:
            failed = stage
            print(
                f"--- {stage} failed (exit {rc}); the end of {log}:\n" + "\n".join(log.read_text().splitlines()[-30:])
            )
            break

    print("\n| stage | seconds | exit | peak GPU GB | |\n|---|---|---|---|---|")
    for stage, sec, rc, peak, note in rows:
        note = note or ("compiled decoding" if stage == COMPILED_STAGE and a.device == "cuda" else "")
        print(f"| {stage} | {sec:.1f} | {rc} | {'–' if peak is None else f'{peak:.3f}'} | {note} |")
    print(f"total {time.time() - t0:.0f} s, {a.device}; runs and logs in {out}")
    if failed:
        raise SystemExit(1)
    if not a.out:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
