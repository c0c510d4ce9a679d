"""Policy learning (RWML paper, Sec. 3.1): GRPO on the terminal task-success reward of ALFWorld or
τ²-bench, from the base model, a WM SFT checkpoint or an RWML checkpoint.

    python train_policy.py --model runs/rwml/checkpoint/model --out runs/rwml_policy_rl
    python train_policy.py --env tau2 --domain retail airline telecom --model runs/rwml_tau2/checkpoint/model \
        --out runs/tau2_policy

Each update takes --games-per-step training games and plays G episodes of each from the same start,
all of them in parallel through collect.py's batched loop (temperature 1.0, at most 15 steps; τ²: τ²'s own
limit of 200 orchestrator steps). An
episode's reward is 1 if it is won (τ²: tau2's evaluator gives reward 1), else 0. With gamma = 1 and only a
terminal reward, every agent turn of an episode gets the episode's group-normalised advantage; the loss
covers the tokens the agent wrote in each turn, given the prompt it saw at that turn. Turns of a group
whose episodes all failed (or all won) have advantage 0 and would add only the KL term: they are left out,
so a step where every group is like that changes no weight.

--method rft is Table 1's other baseline that learns from task success, rejection-sampling fine-tuning (RFT,
paper Sec. 3.1): the start model plays N episodes of every training game (temperature 1.0), then SFT on every
turn of the episodes it won (the tokens it wrote, given the prompt it saw), for --rft-epochs.

    python train_policy.py --method rft --model Qwen/Qwen2.5-7B-Instruct --out runs/rft

Writes, in --out: rollouts.jsonl (every training episode, with its update `step`; RFT: its sampling, step 0),
metrics.jsonl (+ metrics.png), checkpoint/ (checkpoint/model is a plain HF folder for evaluate.py --model);
RFT also won_turns.jsonl (the token ids it trains on) and rft.json (its sampling's success).
"""

import json
import math
import random
import time
from pathlib import Path

from tqdm import tqdm

from collect import episode_key, play, rollout_record, select_games
from grpo import group_advantages, grpo_update, sft_update
from support.alfworld_env import game_id
from support.checks import SkipCounter, at_least, check_model, claim_out, parser, positive
from support.distributed import all_sum, full_weights, gather, init_distributed, rank_world
from support.episode import summary
from support.lm import TINY_MODEL, cut_warning
from support.lora import adapters_merged
from support.memory import peak_memory, plan_policy
from support.play import add_play_args, play_defaults, play_settings
from support.runs import (
    append_jsonl,
    open_step_log,
    plot_metrics,
    read_jsonl,
    resume_jsonl,
    run_stage,
    set_seed,
)
from support.schema import ROLLOUT
from support.training import add_grpo_args, check_precision, save_checkpoint, start_training

UPDATES = dict(alfworld=300, tau2=200)  # GRPO steps of the paper's Policy RL runs (B.2, C.2), the same for every start
RFT_EPISODES = dict(alfworld=3, tau2=6)  # RFT's N: the paper's N of interaction learning (B.1, C.1); RFT's own unstated
LR_GRPO, LR_RFT = 1e-6, 2e-6  # full fine-tuning; RFT's rate is not stated: WM SFT's, the paper's SFT rate (B.1, C.1)


def parse_args(argv=None):
    p = parser(__doc__)
    arg = p.add_argument
    arg("--model", type=check_model, default=TINY_MODEL, help="HF id or folder to start from (base, WM SFT, RWML)")
    arg("--split", default="train", help="split the policy trains on")
    arg("--games", type=at_least(), help="train on N games (τ²: tasks) of the split (default: all; ALFWorld 200)")
    arg("--method", choices=["grpo", "rft"], default="grpo", help="grpo: Policy RL; rft: Table 1's RFT (Sec. 3.1)")
    # RFT: N episodes a game (the paper's N of interaction learning, B.1, C.1), SFT on the won turns (WM SFT's budget)
    arg("--rft-episodes", type=at_least(), help="RFT: N episodes of every game (default: 3 ALFWorld, 6 τ²)")
    arg("--rft-epochs", type=positive(), default=2.0, help="RFT: SFT epochs over the won turns (not stated: 2)")
    arg("--rft-batch", type=at_least(), default=32, help="RFT: agent turns per SFT update (not stated: 32)")
    # Policy RL (paper B.2, C.2)
    arg("--games-per-step", type=at_least(), default=16, help="games per update, each played G times")
    arg("--group-size", type=at_least(2, "GRPO normalises within a group"), default=8, help="G (paper: 8)")
    arg("--updates", type=at_least(), help="GRPO updates (default: the paper's, 300 ALFWorld B.2, 200 τ² C.2)")
    # --max-steps default: 15 on ALFWorld (RFT: 30, as B.1 collects), τ²'s own 200 (C.2: 30, the Makefile's);
    # --batch-games: all G x games-per-step
    add_play_args(p, temperature=1.0, batch_games=None)
    arg("--save-every", type=at_least(), default=10, help="updates between checkpoints")
    plan = "a turn's prompt tokens in the memory plan (default: 1,536 ALFWorld; τ²: the longest opening + 16,384)"
    arg("--plan-prompt-len", type=at_least(), help=plan)
    # --lr, --clip-eps, --beta, --ppo-epochs, --micro-batch, --lora-rank, --dtype, --resume, ... (support/training.py)
    add_grpo_args(p, lr=None, lr_help=f"default: {LR_GRPO:g}, RFT {LR_RFT:g} (RFT's not stated: the paper's SFT rate)")
    arg("--seed", type=int, default=0, help="random seed")
    arg("--out", default="runs/policy", help="output folder")
    args = p.parse_args(argv)
    play_defaults(args, max_steps=30 if args.method == "rft" else 15, model=args.model)  # RFT samples as B.1 collects
    args.updates = args.updates or UPDATES[args.env]
    args.rft_episodes = args.rft_episodes or RFT_EPISODES[args.env]
    args.lr = args.lr or (LR_RFT if args.method == "rft" else LR_GRPO)
    args.batch_games = args.batch_games or args.games_per_step * args.group_size
    args.fit_micro_batch, args.micro_batch = args.micro_batch is None, args.micro_batch or 8  # not given: as fits
    return args


def check_args(args):
    """The training games (`--games` of the split), checked before any model loads, and the memory plan
    (`memory.plan_policy`: --micro-batch and --batch-games halved until it fits; --dry-run prints it and exits)."""
    check_precision(args)  # no full fine-tuning in bf16
    games = select_games(args.env, args.split, args.games, args.domain, args.tasks)
    prompt_len = args.plan_prompt_len or 1536
    if args.env == "tau2":  # the real opening prompts + their growth; a longer prompt ends its episode
        from support.tau2_env import prompt_budget

        budget = prompt_budget(args.model, args.domain, args.max_new_tokens)
        prompt_len = args.max_prompt_tokens = args.plan_prompt_len or budget
    plan_policy(args, len(games), prompt_len)
    return games


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC: which games an update plays, its turn batch; RFT's data
# ---------------------------------------------------------------------------------------------
def game_schedule(games, per_step, seed, steps):
    """The games of each of `steps` updates, `per_step` distinct games each: epoch e visits every game once, in an
    order shuffled by (seed, e), and a step takes the next games in that stream. Where a step straddles two
    epochs, the games it already holds go last in the new epoch, so no game is played twice in a step (its two
    groups would be one group's episodes) and every game is visited as often as any other, give or take one."""
    stream = []
    for epoch in range(math.ceil(steps * per_step / len(games))):
        order = random.Random(seed * 1000 + epoch).sample(games, len(games))
        held = set(stream[len(stream) - len(stream) % per_step :])  # the unfinished step's games
        stream += [g for g in order if g not in held] + [g for g in order if g in held]
    return [stream[i * per_step : (i + 1) * per_step] for i in range(steps)]


def turn_batch(episodes, G):
    """Episodes in groups of G (one game each, in order) -> the agent turns to train on, their advantages,
    and the number of groups without signal."""
    # ---- EXERCISE 9: the policy's turn batch (paper Sec. 3.1, B.2) ----
    # Eq. multi-turn GRPO: reward r_i = 1 if episode i was won, else 0 (terminal, gamma = 1); A_i normalised within
    # its game's group of G (Exercise 3's function); then A_{i,t} = A_i for every agent turn t of episode i, in
    # order. Left out: turns without tokens (ep.seqs holds None), and the turns of an episode whose A_i is 0. (A
    # departure from the written objective, which averages over every turn: a zero-advantage turn would add only
    # the KL term; dropping it saves its forward and backward. RWML keeps its zero-advantage groups: rwml_step.)
    adv, no_signal = group_advantages([float(ep.won) for ep in episodes], G)
    turns = [(seq, a) for ep, a in zip(episodes, adv.tolist()) for seq in ep.seqs if seq is not None and a != 0]
    # ---- END EXERCISE 9 ----
    return [s for s, _ in turns], [a for _, a in turns], no_signal


def won_turns(episodes):
    """RFT's data: every turn the model wrote in the episodes that were won, as (prompt_ids, completion_ids)."""
    return [seq for ep in episodes if ep.won for seq in ep.seqs if seq is not None]


# ---------------------------------------------------------------------------------------------
# RFT: rejection sampling, then SFT on the won turns
# ---------------------------------------------------------------------------------------------
def rft_sample(args, games, model, tok, settings, user, out):
    """RFT's rejection sampling: N episodes of every game with the start model, a block of --batch-games at a time
    (under torchrun: split over the ranks); every episode into rollouts.jsonl, the won ones' turns into
    won_turns.jsonl (the turns first: a kill between the two replays the episode). --resume plays only the episodes
    missing from rollouts.jsonl. Returns all rollout records and all won turns (every rank holds them all)."""
    rank, world = rank_world()
    # rank 0 reads (and rewrites) what a killed run left; gather hands every rank its lists
    rollouts = gather(resume_jsonl(out / "rollouts.jsonl", args.resume, schema=ROLLOUT) if rank == 0 else [])
    done = {episode_key(r["game"], r["episode"]) for r in rollouts}
    keep = lambda t: t["episode"] in done  # turns of an episode whose rollout line was not written: played again
    kept = gather(resume_jsonl(out / "won_turns.jsonl", args.resume, keep) if rank == 0 else [])
    turns = [(t["prompt_ids"], t["completion_ids"]) for t in kept]
    name = (lambda g: g) if args.env == "tau2" else game_id
    jobs = [(g, args.split, e) for g in games for e in range(args.rft_episodes) if episode_key(name(g), e) not in done]
    block = args.batch_games * world
    f_rollouts = open(out / "rollouts.jsonl", "a", encoding="utf-8") if rank == 0 else None
    f_turns = open(out / "won_turns.jsonl", "a", encoding="utf-8") if rank == 0 else None
    total = len(games) * args.rft_episodes
    bar = tqdm(total=total, initial=len(rollouts), desc="rft sampling", unit="ep", disable=rank > 0)
    for i in range(0, len(jobs), block):
        with full_weights(model), adapters_merged(model):  # (--fsdp: every rank whole; LoRA: folded in)
            episodes = list(play(jobs[i : i + block][rank::world], model, tok, settings, user))
        records = [rollout_record(ep, settings) for ep in episodes]
        won = gather(  # the won turns, and their episode's key so that --resume keeps whole episodes
            dict(episode=episode_key(r["game"], r["episode"]), prompt_ids=list(p), completion_ids=list(c))
            for ep, r in zip(episodes, records)
            for p, c in won_turns([ep])
        )
        records = gather(dict(r, step=0) for r in records)
        if rank == 0:
            append_jsonl(f_turns, won)
            append_jsonl(f_rollouts, records)
        rollouts += records
        turns += [(t["prompt_ids"], t["completion_ids"]) for t in won]
        bar.update(len(records))
        bar.set_postfix(success=f"{summary(rollouts)['success']:.2f}", won_turns=len(turns))
    bar.close()
    for f in (f_rollouts, f_turns):
        if f:
            f.close()
    return rollouts, turns


def rft(args, games, model, tok, optimizer, start, out, settings, user):
    """Rejection-sampling fine-tuning (paper Sec. 3.1, Table 1's RFT row): sample, keep the won episodes, SFT on
    them for --rft-epochs in batches of --rft-batch turns; checkpoints every --save-every updates. --resume plays
    only the episodes missing from rollouts.jsonl (none once the SFT has started) and continues the SFT."""
    rank, world = rank_world()
    ckpt = out / "checkpoint"
    rollouts, turns = rft_sample(args, games, model, tok, settings, user, out)
    stats = dict(episodes=len(rollouts), won_episodes=sum(r["won"] for r in rollouts), won_turns=len(turns))
    if rank == 0:
        (out / "rft.json").write_text(json.dumps(dict(stats, **summary(rollouts)), indent=1) + "\n")
    steps_per_epoch = math.ceil(len(turns) / args.rft_batch)
    total = math.ceil(args.rft_epochs * steps_per_epoch)
    f_metrics = open_step_log(out / "metrics.jsonl", args.resume, start)
    skips = SkipCounter()  # updates skipped for a non-finite loss or gradient norm
    for step in tqdm(range(start, total), initial=start, total=total, desc="rft sft", unit="update", disable=rank > 0):
        t0 = time.time()
        epoch, i = divmod(step, steps_per_epoch)  # epoch e visits the won turns in an order fixed by (seed, e)
        order = random.Random(args.seed * 1000 + epoch).sample(turns, len(turns))
        # ---- ALGO LOGIC: RFT = SFT on the agent's own turns of the episodes it won ----
        update = sft_update(model, optimizer, order[i * args.rft_batch : (i + 1) * args.rft_batch][rank::world], args)
        skipped = update.pop("skipped")
        row = dict(
            step=step + 1,
            **{f"train/{k}": v for k, v in update.items()},
            skipped_updates=skips.update(skipped),
            seconds=time.time() - t0,
            **peak_memory(),
        )
        append_jsonl(f_metrics, [row])
        skips.check(step + 1)
        if (step + 1) % args.save_every == 0:
            save_checkpoint(ckpt, model, tok, optimizer, step + 1, args)
    f_metrics.close()
    save_checkpoint(ckpt, model, tok, optimizer, max(start, total), args, final=True)  # no win: the start model
    if rank > 0:
        return None
    if total:
        plot_metrics(out / "metrics.jsonl")
    print(
        f"RFT: {stats['won_episodes']} of {stats['episodes']} episodes won, {stats['won_turns']} turns, "
        f"{total} SFT updates; model: {ckpt}/model"
        + ("" if total else "\nno episode was won: nothing to train on, the start model is saved as RFT's model")
    )
    return stats


# ---------------------------------------------------------------------------------------------
# Policy RL: the training loop
# ---------------------------------------------------------------------------------------------
def main(args):
    # ---- setup: games, memory plan, model, reference, optimizer, the fixed user (TRY NOT TO MODIFY) ----
    rank, world = init_distributed()  # (0, 1) unless started by torchrun
    set_seed(args.seed + rank)  # ranks play differently; DDP starts them all from rank 0's weights
    games = check_args(args)  # the games, and the memory plan (--dry-run prints it and exits), before the model loads
    out = claim_out(args.out, "train_policy", args.resume) if rank == 0 else Path(args.out)  # once they check out
    ckpt = out / "checkpoint"
    settings = play_settings(args)  # the model acts alone (policy "model"), every episode of a step in flight at once
    model, tok, ref_model, optimizer, start = start_training(args, ckpt, reference=args.method == "grpo")
    user = None
    if args.env == "tau2":  # the fixed user (--user-model local:MODEL), loaded once, never trained
        from support.tau2_env import load_user

        user = load_user(args.user_model, args.dtype)
    if args.method == "rft":
        return rft(args, games, model, tok, optimizer, start, out, settings, user)
    f_metrics = open_step_log(out / "metrics.jsonl", args.resume, start)
    f_rollouts = open_step_log(out / "rollouts.jsonl", args.resume, start)
    G, per_step = args.group_size, min(args.games_per_step, len(games))
    skips = SkipCounter()  # updates skipped for a non-finite loss or gradient norm
    schedule = game_schedule(games, per_step, args.seed, args.updates)  # every update's games, fixed by the seed
    bar = tqdm(
        range(start, args.updates),
        initial=start,
        total=args.updates,
        desc="train_policy",
        unit="update",
        disable=rank > 0,
    )
    for step in bar:
        t0 = time.time()
        # ---- interaction: G episodes of each game, all in flight through collect.play (torchrun: per rank) ----
        jobs = [(g, args.split, i) for g in schedule[step][rank::world] for i in range(G)]
        with full_weights(model), adapters_merged(model):  # (--fsdp: every rank whole; LoRA: folded in)
            episodes = sorted(play(jobs, model, tok, settings, user), key=lambda ep: ep.job)  # in job (group) order
        rollouts = gather(dict(rollout_record(ep, settings), step=step + 1) for ep in episodes)  # all ranks' episodes
        append_jsonl(f_rollouts, rollouts)
        rollout_seconds = time.time() - t0
        # ---- ALGO LOGIC: GRPO on task success, every turn weighted by its episode's advantage ----
        seqs, adv, no_signal = turn_batch(episodes, G)
        trained, no_signal = all_sum([len(seqs), no_signal])  # over all ranks: every rank updates, or none
        stats = grpo_update(model, optimizer, seqs, adv, args, ref_model) if trained else dict(skipped=0)
        skipped = stats.pop("skipped")
        row = dict(
            step=step + 1,
            **summary(rollouts),
            groups=len(rollouts) // G,
            no_signal_groups=int(no_signal),
            trained_turns=int(trained),
            updated=bool(trained) and not skipped,
            **{f"train/{k}": v for k, v in stats.items()},
            skipped_updates=skips.update(skipped),
            rollout_seconds=rollout_seconds,
            seconds=time.time() - t0,
            **peak_memory(),
        )
        append_jsonl(f_metrics, [row])
        skips.check(step + 1)  # a few non-finite updates in a row: stop, naming the step
        bar.set_postfix(
            success=f"{row['success']:.2f}",
            invalid=f"{row['invalid_rate']:.2f}",
            no_signal=f"{no_signal}/{row['groups']}",
        )
        if (step + 1) % args.save_every == 0 or step + 1 == args.updates:
            save_checkpoint(ckpt, model, tok, optimizer, step + 1, args, final=step + 1 == args.updates)
    f_metrics.close()
    f_rollouts.close()
    if rank > 0:
        return None
    plot_metrics(out / "metrics.jsonl")
    rows = read_jsonl(out / "metrics.jsonl")
    if rows:
        print(
            f"training success {rows[0]['success']:.3f} -> {rows[-1]['success']:.3f}, invalid-action rate "
            f"{rows[0]['invalid_rate']:.3f} -> {rows[-1]['invalid_rate']:.3f}, updates with signal "
            f"{sum(r['updated'] for r in rows)} of {len(rows)}; model: {ckpt}/model"
        )
        cut = cut_warning(sum(r["cut_turn_rate"] for r in rows) / len(rows), "agent turns")
        silent = (
            "no update had a learning signal: in every group all G episodes ended alike (a model that writes no "
            "admissible action wins no game; docs/stages.md)"
        )
        print(*[w for w in (cut, silent if not any(r["updated"] for r in rows) else None) if w], sep="\n")
    print(f"next: python evaluate.py --model NAME={ckpt}/model --out ...  (Table 1; τ²: with --env tau2)")
    return rows


if __name__ == "__main__":
    args = parse_args()
    run_stage(main, args, Path(args.out) / "checkpoint")  # Ctrl-C: one line, exit status 130
