"""World-model learning (RWML paper, Sec. 2.2): teach the model to predict the next state of the
environment from triplets collected by collect.py.

    python train_wm.py --mode split --triplets runs/collect/triplets.jsonl --out runs/split
    python train_wm.py --mode sft --triplets runs/split/heldout.jsonl --out runs/pi_prime
    python train_wm.py --mode filter --model runs/pi_prime/checkpoint/model --triplets runs/split/train.jsonl \
        --heldout runs/split/heldout.jsonl --out runs/filter
    python train_wm.py --mode rwml --triplets runs/filter/triplets.filtered.jsonl --heldout runs/split/heldout.jsonl \
        --out runs/rwml
    python train_wm.py --mode sft --triplets runs/filter/triplets.filtered.jsonl --heldout runs/split/heldout.jsonl \
        --out runs/wm_sft

Modes (the easy-triplet filter of Sec. 2.2 is the first three commands: split, an auxiliary model pi', filter):
  split   --val-frac (10%) of the games -> heldout.jsonl, the rest -> train.jsonl. pi' trains on heldout.jsonl,
          which is also the held-out world-model set: pi' is never evaluated, no evaluated model trains on it
  sft     the WM SFT baseline (and pi'): cross-entropy on an empty thought, then "<next_state>{s}</next_state>"
  filter  the easy-triplet filter: --model (pi') makes K predictions per triplet, scored at the filter's own tau_d;
          a triplet whose mean reward exceeds tau_easy is easy and kept with probability 0.1 (paper B.1, Table A2:
          tau_d 0.1 ALFWorld / 0.15 τ², tau_easy 0.0, p 0.1); writes triplets.filtered.jsonl
  rwml    GRPO with the sim-to-real gap reward: r = 1[1 - cos(E(s_hat), E(s)) < tau_d]   (the method)

Writes, in --out: heldout.jsonl (the held-out triplets: --heldout, else --val-frac of the games of --triplets),
metrics.jsonl (+ metrics.png), heldout_predictions.jsonl (the last held-out evaluation's predictions),
checkpoint/ (checkpoint/model is a plain HF folder for --model of later stages).
"""

import math
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from grpo import group_advantages, grpo_update, sft_update
from reward import (
    DEFAULT_EMBEDDER,
    JUDGE_REPLY,
    Embeddings,
    default_tau,
    embedder_bytes,
    judge,
    mean_scores,
    parse_next_state,
    sim_to_real,
    wm_prompt,
)
from support.checks import (
    SkipCounter,
    at_least,
    check_model,
    claim_out,
    distance_threshold,
    fraction,
    non_negative,
    parser,
    positive,
    ranged,
)
from support.distributed import full_weights, gather, init_distributed, rank_world
from support.lm import TINY_MODEL, chat_prompt, generate, hit_limit, load_model, load_tokenizer, sample
from support.lora import adapters_merged
from support.memory import peak_memory, plan_wm
from support.report import collapse, filter_summary, wm_summary
from support.runs import append_jsonl, open_step_log, resume_jsonl, run_stage, set_seed, write_jsonl
from support.schema import TRIPLET
from support.training import add_grpo_args, save_checkpoint, start_training
from support.triplets import THINK_TOKENS, check_wm_args, game_of

# the easy-triplet filter's own tau_d (paper B.1, C.1, Table A2): "set such that too-easy samples correspond to
# ~30% of the original dataset"; the training tau_d is this + 0.15, rounded to the nearest 0.2 (0.2, 0.4)
FILTER_TAU = dict(alfworld=0.1, tau2=0.15)
LR_RWML, LR_SFT = 1e-6, 2e-6  # full fine-tuning (paper B.1, C.1): WM SFT learns at twice RWML's rate


def parse_args(argv=None):
    p = parser(__doc__)
    arg = p.add_argument
    modes = "rwml: GRPO on the sim-to-real reward; sft: WM SFT (and pi'); filter: the easy triplets; split: pi''s games"
    arg("--mode", default="rwml", choices=["rwml", "sft", "filter", "split"], help=modes)
    arg("--triplets", required=True, help="triplets.jsonl from collect.py (or filtered by --mode filter)")
    prompts = "rwml: think, then predict (Table A4); sft: predict (Table A5: WM SFT's, pi''s); default: by --mode"
    arg("--prompt", choices=["rwml", "sft"], help=prompts)
    arg("--model", type=check_model, default=TINY_MODEL, help="HF id or local folder to start from")
    arg("--embedder", default=DEFAULT_EMBEDDER, help="sentence-transformers id (paper: Qwen/Qwen3-Embedding-8B)")
    arg("--embed-dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA, fp32 on CPU")
    judges = "the sim-to-real gap (the method), or Table 4's LLM judge (prompt A8): a score in [0, 1], or 0 / 1"
    arg("--reward", default="embedding", choices=["embedding", "judge", "judge-binary"], help=judges)
    arg("--judge-model", type=check_model, default=TINY_MODEL, help="HF id or folder of the judge (thinking off)")
    arg("--judge-max-new-tokens", type=at_least(), default=256, help="the judge's budget (unfinished verdict: 0)")
    arg("--tau", type=distance_threshold(), help="tau_d (paper: 0.2 ALFWorld, 0.4 τ²; default: the embedder's)")
    # RWML (paper B.1, ALFWorld: G 8, batch 32, 2 epochs; τ²: G 16)
    arg("--group-size", type=int, default=8, help="G: predictions sampled per triplet in --mode rwml, at least 2")
    arg("--batch-size", type=at_least(), default=32, help="triplets per update (paper: 32)")
    arg("--epochs", type=positive(), default=2, help="passes over the training triplets (paper: 2)")
    arg("--max-steps", type=at_least(), help="stop after this many updates (default: --epochs)")
    arg("--temperature", type=non_negative("0 is greedy"), default=1.0, help="sampling temperature of the G")
    budget = f"a prediction's budget (default: the longest next state + {THINK_TOKENS} to think)"
    arg("--max-new-tokens", type=at_least(), help=budget)
    arg("--gen-batch", type=at_least(), help="sequences per generate call (default: 64 on CPU, CUDA: the plan's)")
    # held-out evaluation, checkpoints
    in_01 = ranged(float, lambda v: 0 < v < 1, "in (0, 1)", "the held-out share")
    arg("--val-frac", type=in_01, default=0.1, help="share of the games held out (paper: 10%%)")
    arg("--heldout", metavar="TRIPLETS", help="held-out triplets of other games (default: --val-frac's)")
    arg("--val-size", type=at_least(), help="held-out triplets scored at each evaluation (default: all)")
    arg("--eval-every", type=at_least(), default=10, help="updates between held-out evaluations")
    arg("--no-start-eval", action="store_true", help="no evaluation before the first update (its scores known)")
    arg("--save-every", type=at_least(), default=50, help="updates between checkpoints")
    # the easy-triplet filter (paper Sec. 2.2, B.1, Table A2)
    arg("--filter-k", type=at_least(), default=10, help="K: predictions per triplet in --mode filter (paper: 10)")
    arg("--filter-tau", type=distance_threshold(), help="the filter's tau_d (default: 0.1 ALFWorld, 0.15 τ²)")
    arg("--tau-easy", type=non_negative(), default=0.0, help="easy: mean reward of the K above this (paper: 0)")
    arg("--keep-easy", type=fraction(), default=0.1, help="probability of keeping an easy triplet (paper: 0.1)")
    # --lr, --clip-eps, --beta, --ppo-epochs, --micro-batch, --lora-rank, --dtype, --resume, ... (support/training.py)
    add_grpo_args(p, lr=None, lr_help=f"default: {LR_RWML:g} for rwml, {LR_SFT:g} for sft (paper B.1, C.1)")
    arg("--seed", type=int, default=0, help="random seed")
    arg("--out", default="runs/wm", help="output folder")
    args = p.parse_args(argv)
    args.prompt = args.prompt or ("rwml" if args.mode == "rwml" else "sft")
    args.fit_micro_batch, args.micro_batch = args.micro_batch is None, args.micro_batch or 8  # not given: as fits
    if args.lr is None:  # paper B.1, C.1: RWML 1e-6, WM SFT twice that (full fine-tuning)
        args.lr = LR_SFT if args.mode == "sft" else LR_RWML
    if args.mode == "rwml" and args.group_size < 2:  # checked where it is used: sft and the filter sample no group
        p.error(f"--group-size must be ≥ 2 (GRPO normalises within a group), got {args.group_size}")
    return args


def think(args):
    """Whether the world model reasons before it predicts: RWML's prompt (Table A4), not WM SFT's (Table A5)."""
    return args.prompt == "rwml"


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC: one RWML update, one WM SFT update, the easy-triplet filter
# ---------------------------------------------------------------------------------------------
def rwml_step(model, tok, optimizer, batch, embed, args, ref_model=None, ask=None):
    """RWML = GRPO with the sim-to-real gap reward (paper Sec. 2.2): G predictions of each triplet's next state,
    each scored against the real one, group-normalised advantages, one GRPO update. Every group is kept, also
    one whose G rewards are equal (its advantages are 0: it adds only the KL term; Policy RL drops such episodes'
    turns, train_policy.turn_batch). `ask`: the judge (--reward judge*). Returns the update's statistics."""
    G = args.group_size
    prompts = [chat_prompt(tok, wm_prompt(t, think(args))) for t in batch]  # G predictions, one prefill each
    with full_weights(model), adapters_merged(model):  # (--fsdp: every rank whole; LoRA: folded in)
        samples = sample(model, tok, prompts, args.max_new_tokens, args.temperature, batch_size=args.gen_batch, n=G)
    texts, real = [text for _, _, text in samples], [t for t in batch for _ in range(G)]
    scores = sim_to_real(texts, [t["next_state"] for t in real], embed, args.tau, [t.get("kind") for t in real])
    if args.reward == "embedding":
        rewards = [s["reward"] for s in scores]
    else:  # the judge's verdicts replace the sim-to-real reward (Table 4's ablation)
        rewards = judge(texts, real, ask, binary=args.reward == "judge-binary")
    adv, no_signal = group_advantages(rewards, G)
    stats = grpo_update(model, optimizer, [(p, c) for p, c, _ in samples], adv, args, ref_model)
    rewards, lengths = gather(rewards), gather(len(c) for _, c, _ in samples)  # all ranks' samples
    cut = gather(hit_limit(model, tok, c, args.max_new_tokens) for _, c, _ in samples)
    return dict(
        stats,
        **mean_scores(gather(scores)),
        optimised_reward=sum(rewards) / len(rewards),
        reward_std=torch.tensor(rewards).std().item(),
        no_signal_groups=sum(gather([no_signal])),
        groups=len(rewards) // G,
        completion_len=sum(lengths) / len(lengths),
        truncated=sum(cut) / len(lengths),  # the share of predictions the token budget cut
    )


def sft_target(tok, triplet):
    """WM SFT's target tokens: an empty thought, then the real next state, then end of turn. The empty thought
    is written as Qwen3's template writes an assistant turn without reasoning, so that the target is one think
    block after a prompt that opens none (tests/test_chat_templates.py)."""
    # ---- EXERCISE 8: the WM SFT target (paper Sec. 2.2) ----
    # Eq. WM SFT target: y = an empty thought, written exactly as Qwen3's chat template writes the answer of a turn
    # without reasoning (tests/data/chat_templates), then the real next state in its <next_state> tags, then the
    # tokenizer's end token; no special tokens before it
    text = f"<think>\n\n</think>\n\n<next_state>{triplet['next_state']}</next_state>"
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # ---- END EXERCISE 8 ----


def sft_step(model, tok, optimizer, batch, args):
    """WM SFT (the baseline, and pi'): one cross-entropy update towards the real next states."""
    prompt = lambda t: tok(chat_prompt(tok, wm_prompt(t, think(args))), add_special_tokens=False)["input_ids"]
    return sft_update(model, optimizer, [(prompt(t), sft_target(tok, t)) for t in batch], args)


def easy_triplets(scored, args, rng):
    """The easy-triplet filter's rule on triplets scored by pi' (`filter_reward`, the mean reward of K
    predictions): (easy flags, the kept triplets)."""
    # ---- EXERCISE 7: the easy-triplet filter (paper Sec. 2.2) ----
    # Eq. 1, easy triplet: mean reward of its K predictions (at the filter's tau_d) > tau_easy (paper: 0.0, so one
    # prediction within tau_d of K makes a triplet easy); easy ones are kept with probability keep_easy (p = 0.1)
    easy = [s["filter_reward"] > args.tau_easy for s in scored]
    kept = [s for s, e in zip(scored, easy) if not e or rng.random() < args.keep_easy]
    # ---- END EXERCISE 7 ----
    return easy, kept


def run_filter(args, triplets, model, tok, embed):
    """Score every (training) triplet with K predictions of the filter model; keep hard ones, easy ones w.p.
    keep_easy. Resumable: scored.jsonl grows a batch of triplets at a time."""
    out, K = Path(args.out), args.filter_k
    scored = resume_jsonl(out / "scored.jsonl", args.resume, schema=TRIPLET, required=("filter_reward",))
    done = {s["id"] for s in scored}
    todo = [t for t in triplets if t["id"] not in done]
    per_call = max(1, args.gen_batch // K)  # triplets whose K predictions share one generate call
    with open(out / "scored.jsonl", "a", encoding="utf-8") as f:
        for i in tqdm(range(0, len(todo), per_call), desc="filter", unit="batch"):
            chunk = todo[i : i + per_call]
            prompts = [chat_prompt(tok, wm_prompt(t, think(args))) for t in chunk]  # K predictions, one prefill each
            outputs = generate(
                model, tok, prompts, args.max_new_tokens, args.temperature, batch_size=args.gen_batch, n=K
            )
            real = [t for t in chunk for _ in range(K)]
            recs = sim_to_real(
                outputs, [t["next_state"] for t in real], embed, args.filter_tau, [t.get("kind") for t in real]
            )
            rows = [
                dict(t, filter_reward=sum(r["reward"] for r in recs[j * K : (j + 1) * K]) / K)
                for j, t in enumerate(chunk)
            ]
            append_jsonl(f, rows)
            scored += rows
    easy, kept = easy_triplets(scored, args, random.Random(args.seed))
    write_jsonl(out / "triplets.filtered.jsonl", kept)
    return filter_summary(args, scored, easy, kept)  # metrics.jsonl, and the easy share beside the paper's ~30%


# ---------------------------------------------------------------------------------------------
# The held-out world-model scores (greedy predictions against the real next states)
# ---------------------------------------------------------------------------------------------
def predict_and_score(model, tok, triplets, embed, tau, max_new_tokens, batch_size, reason=True):
    """The model's greedy next-state predictions for `triplets` and their sim-to-real scores: (outputs, records);
    each record says whether its prediction was cut by the token budget (`truncated`)."""
    samples = sample(
        model,
        tok,
        [chat_prompt(tok, wm_prompt(t, reason)) for t in triplets],
        max_new_tokens,
        temperature=0,
        batch_size=batch_size,
    )
    outputs = [text for _, _, text in samples]
    records = sim_to_real(outputs, [t["next_state"] for t in triplets], embed, tau, [t.get("kind") for t in triplets])
    for r, (_, c, _) in zip(records, samples):
        r["truncated"] = hit_limit(model, tok, c, max_new_tokens)
    return outputs, records


def heldout_scores(triplets, records):
    """mean_scores of all records and their number, then the same of those whose triplet's action was valid and
    invalid ("valid/reward", "invalid/triplets", ...) where the triplets say so (ALFWorld's do)."""
    out = dict(mean_scores(records), triplets=len(records))
    for name, want in (("valid", True), ("invalid", False)):
        part = [r for t, r in zip(triplets, records) if t.get("valid") is want]
        if part:
            out.update({f"{name}/{k}": v for k, v in mean_scores(part).items()}, **{f"{name}/triplets": len(part)})
    return out


def wm_heldout(model, tok, heldout, embed, tau, args):
    """Greedy predictions on held-out triplets -> (scores, predictions): mean reward, similarity, format and
    exact-match rates, overall and for valid / invalid actions, and how varied the predicted next states are
    (`collapse`); one prediction record per triplet (ranks share the work)."""
    rank, world = rank_world()
    mine = heldout[rank::world]
    with full_weights(model), adapters_merged(model):
        outputs, scores = predict_and_score(
            model, tok, mine, embed, tau, args.max_new_tokens, args.score_batch, think(args)
        )
    in_rank_order = [t for r in range(world) for t in heldout[r::world]]  # the order `gather` returns
    outputs, scores = gather(outputs), gather(scores)
    predicted, real = [parse_next_state(o) for o in outputs], [t["next_state"] for t in in_rank_order]
    spread = collapse(predicted, real)
    predictions = [
        dict(id=t["id"], output=o, next_state=t["next_state"], **r) for t, o, r in zip(in_rank_order, outputs, scores)
    ]
    scores = dict(heldout_scores(in_rank_order, scores), distinct=spread["distinct"], top_share=spread["top_share"])
    return scores, predictions


def main(args):
    # ---- setup: data checks, memory plan, model, reference policy, optimizer (TRY NOT TO MODIFY) ----
    rank, world = init_distributed()  # (0, 1) unless started by torchrun
    set_seed(args.seed + rank)  # ranks sample differently; DDP starts them all from rank 0's weights
    triplets, train, heldout = check_wm_args(args, world, default_tau, FILTER_TAU)  # before the model loads
    if args.mode == "split" and args.dry_run:
        print(f"--dry-run: split writes {len(heldout)} + {len(train)} triplets and loads no model")
        raise SystemExit(0)
    if args.mode != "split":  # --dry-run: the memory and time plans, then exit
        tok = load_tokenizer(args.model)
        prompt_len = max(
            len(tok(chat_prompt(tok, wm_prompt(t, think(args))), add_special_tokens=False)["input_ids"])
            for t in triplets
        )
        states = [t["next_state"] for t in triplets]  # the embedder's longest batch: these, or a prediction
        embedder = embedder_bytes(args.embedder, args.embed_dtype, states, args.max_new_tokens)
        plan_wm(args, prompt_len, embedder, train, heldout)
    # --out is this run's once the data checked out and the plan fits (a dry run or a data error leaves it as it was)
    out = claim_out(args.out, f"train_wm --mode {args.mode}", args.resume) if rank == 0 else Path(args.out)
    ckpt = out / "checkpoint"
    if args.mode == "split":  # the paper's 10% of the data for pi' (Sec. 2.2), by game; no model
        write_jsonl(out / "heldout.jsonl", heldout)
        write_jsonl(out / "train.jsonl", train)
        games = lambda ts: len({game_of(t) for t in ts})
        print(
            f"{len(heldout)} triplets of {games(heldout)} games -> {out}/heldout.jsonl (pi' trains on them; the "
            f"held-out set), {len(train)} of {games(train)} games -> {out}/train.jsonl (the filter scores them)\n"
            f"next: python train_wm.py --mode sft --triplets {out}/heldout.jsonl --out PI_PRIME, then --mode filter "
            f"--model PI_PRIME/checkpoint/model --triplets {out}/train.jsonl --heldout {out}/heldout.jsonl"
        )
        return dict(heldout=len(heldout), train=len(train))
    if args.mode == "filter":  # the held-out games are set aside before the filter: it scores the training games
        write_jsonl(out / "heldout.jsonl", heldout)
        model, tok = load_model(args.model, dtype=args.dtype)
        return run_filter(args, train, model, tok, Embeddings(args.embedder, dtype=args.embed_dtype))
    model, tok, ref_model, optimizer, start = start_training(args, ckpt, reference=args.mode == "rwml")
    embed, ask = Embeddings(args.embedder, dtype=args.embed_dtype), None
    if args.reward != "embedding":  # a frozen judge, never the model being trained; its reply opens Table A8's JSON
        jm, jt = load_model(args.judge_model, dtype=args.dtype)
        judge_prompt = lambda p: chat_prompt(jt, p, thinking=False) + JUDGE_REPLY
        ask = lambda ps: generate(
            jm, jt, list(map(judge_prompt, ps)), args.judge_max_new_tokens, 0, batch_size=args.gen_batch
        )
    if rank == 0:
        write_jsonl(out / "heldout.jsonl", heldout)
    heldout = heldout[: args.val_size]
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    f_metrics = open_step_log(out / "metrics.jsonl", args.resume, start)
    if start == 0 and not args.no_start_eval:
        scores, _ = wm_heldout(model, tok, heldout, embed, args.tau, args)
        append_jsonl(f_metrics, [dict(step=0, **{f"heldout/{k}": v for k, v in scores.items()})])
    skips = SkipCounter()  # updates skipped for a non-finite loss or gradient norm

    def batch_at(step):  # epoch e visits the training triplets in a shuffled order fixed by (seed, e)
        epoch, i = divmod(step, steps_per_epoch)
        order = random.Random(args.seed * 1000 + epoch).sample(train, len(train))
        return order[i * args.batch_size : (i + 1) * args.batch_size]

    # ---- ALGO LOGIC: the training loop, RWML (GRPO on the sim-to-real reward) or WM SFT ----
    bar = tqdm(
        range(start, total), initial=start, total=total, desc=f"train_wm {args.mode}", unit="update", disable=rank > 0
    )
    for step in bar:
        t0 = time.time()
        batch = batch_at(step)[rank::world]  # under torchrun each rank takes its share of the triplets
        if args.mode == "rwml":
            stats = rwml_step(model, tok, optimizer, batch, embed, args, ref_model, ask)
        else:
            stats = sft_step(model, tok, optimizer, batch, args)
        skipped = stats.pop("skipped")
        row = dict(step=step + 1, **{f"train/{k}": v for k, v in stats.items()}, skipped_updates=skips.update(skipped))
        row.update(seconds=time.time() - t0, **peak_memory())
        if (step + 1) % args.eval_every == 0 or step + 1 == total:
            scores, predictions = wm_heldout(model, tok, heldout, embed, args.tau, args)
            row.update({f"heldout/{k}": v for k, v in scores.items()})
            if rank == 0 and step + 1 == total:  # what the final model writes, one line a held-out triplet
                write_jsonl(out / "heldout_predictions.jsonl", predictions)
        append_jsonl(f_metrics, [row])
        skips.check(step + 1)  # a few non-finite updates in a row: stop, naming the step
        if (step + 1) % args.save_every == 0 or step + 1 == total:
            save_checkpoint(ckpt, model, tok, optimizer, step + 1, args, final=step + 1 == total)
    f_metrics.close()
    return wm_summary(out) if rank == 0 else None  # metrics.png, the held-out scores' first and last, warnings


if __name__ == "__main__":
    args = parse_args()
    run_stage(main, args, Path(args.out) / "checkpoint" if args.mode != "filter" else None)  # Ctrl-C: one line
