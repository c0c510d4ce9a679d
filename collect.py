"""Interaction learning (RWML paper, Sec. 2.2): the agent plays real ALFWorld games or τ²-bench tasks
and every turn becomes a triplet <state, action, next state> for world-model learning.

    python collect.py --split train --games 20 --episodes 3 --out runs/collect
    python collect.py --env tau2 --domain retail telecom airline --split train --out runs/collect_tau2

Writes, in --out:
  rollouts.jsonl   one episode a line (every turn's observation, raw model output, action, validity)
  triplets.jsonl   one turn a line (task, last H turns of history, state, action, next_state)
  metrics.jsonl    running success / invalid-action rate per finished episode (+ metrics.png)

The acting policy is the model itself (the paper's self-play). `--policy random` samples uniformly
from the admissible commands instead, and `--epsilon e` lets the model act but takes a random
admissible command with probability e: a tiny model writes almost no admissible action, so on CPU
these behaviours give the world model transitions worth learning from. `--invalid-rate q` makes the random
policy send, with probability q, a command admissible earlier in the episode but not now: a stand-in for an
imperfect agent's invalid actions. Their triplets are dropped, as the paper's post-processing drops them (B.1:
"removing some samples that contain invalid actions"; which ones it does not say: all, as the public
reproduction); `--invalid-triplets keep` keeps them (the rollouts keep every turn). No expert data is used.

Below: the flags (those of how episodes are played, shared with train_policy.py and evaluate.py, are in
support/play.py), the agent's prompt, the batched episode loop, the records. This file holds ALFWorld's loop;
τ²-bench (`--env tau2`) is played by support/tau2_env.py, picked in one place (`environment switch` below).
ALFWorld's engine glue is support/alfworld_env.py.
"""

import random
import re
import time
from pathlib import Path

from tqdm import tqdm

from reward import format_history
from support.alfworld_env import SPLITS, game_id, list_games, make_env, split_intro, task_type
from support.checks import at_least, check_disk, check_model, claim_out, fail, fraction, parser
from support.episode import Episode, summary
from support.lm import TINY_MODEL, chat_prompt, cut_warning, hit_limit, load_model, sample, strip_thinking
from support.play import add_plan_args, add_play_args, plan_batch, play_defaults, play_settings
from support.runs import append_jsonl, plot_metrics, resume_jsonl, run_stage, set_seed
from support.schema import METRICS, ROLLOUT, TRIPLET


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--split", default="train", help=f"ALFWorld split ({', '.join(SPLITS)}); τ²: train or test")
    p.add_argument("--games", type=at_least(), default=None, help="N games (τ²: tasks) of the split (default: all)")
    p.add_argument("--first-game", type=at_least(0), default=0, help="start at game K of the split (disjoint runs)")
    p.add_argument("--episodes", type=at_least(), default=3, help="episodes per game (paper: 3)")
    p.add_argument("--policy", default="model", choices=["model", "random"], help="the model, or random admissible")
    p.add_argument("--epsilon", type=fraction(), default=0.0, help="model policy: P(a random admissible command)")
    p.add_argument("--invalid-rate", type=fraction(), default=0.0, help="random policy: P(a command no longer valid)")
    drop = "the triplets of invalid ALFWorld actions: dropped (paper B.1), or kept"
    p.add_argument("--invalid-triplets", choices=["drop", "keep"], default="drop", help=drop)
    p.add_argument("--model", type=check_model, default=TINY_MODEL, help="HF id or folder (default: SmolLM2-135M)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on CUDA, else fp32")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default="runs/collect", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out: play the missing episodes")
    add_play_args(p, temperature=1.0, batch_games=None)  # --env --max-steps --history ... --user-model (support/play)
    add_plan_args(p)  # --max-memory-gb --dry-run
    args = p.parse_args(argv)
    args = play_defaults(args, max_steps=30, model=args.model if args.policy == "model" else None, several_users=True)
    if args.env == "tau2" and args.policy == "random":
        p.error("--policy random needs ALFWorld's admissible commands; τ²-bench has none")
    if args.invalid_rate and args.policy != "random":
        p.error("--invalid-rate is a share of the random policy's commands: use it with --policy random")
    return args


# ---------------------------------------------------------------------------------------------
# The agent: prompt and action parsing (ALGO LOGIC: the policy's input and output format)
# ---------------------------------------------------------------------------------------------
AGENT_PROMPT = """You are an expert agent operating in the ALFRED Embodied Environment.
Your task is to: {task}
Prior to this step, you have already taken {step} step(s). Below are the most recent {h} observations and the \
corresponding actions you took:
{history}
You are now at step {next_step} and your current observation is: {observation}
Your admissible actions of the current situation are: [{admissible}].

Now it's your turn to take an action. You should first reason step-by-step about the current situation. This \
reasoning process MUST be enclosed within <think> </think> tags.
Once you've finished your reasoning, you should choose an admissible action for the current step and present \
it within <action> </action> tags."""


def agent_prompt(task, history, observation, admissible, step, h):
    return AGENT_PROMPT.format(
        task=task,
        step=step,
        h=min(h, len(history)),
        history=format_history(history[-h:] if h else []),
        next_step=step + 1,
        observation=observation,
        admissible=", ".join(f"'{a}'" for a in admissible),
    )


def turn_prompt(tok, ep, h, thinking="on"):
    """The chat-rendered prompt the agent sees at an episode's current turn."""
    return chat_prompt(
        tok,
        agent_prompt(
            ep.task,
            [(t["observation"], t["action"]) for t in ep.turns],
            ep.observation,
            ep.admissible,
            len(ep.turns),
            h,
        ),
        thinking=thinking == "on",
    )


def parse_action(text):
    """The last <action>...</action> of a model output's answer (not of its thinking), normalised like ALFWorld
    commands; "" without tags."""
    found = re.findall(r"<action>(.*?)</action>", strip_thinking(text), flags=re.S)
    return " ".join(found[-1].lower().split()) if found else ""


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC: the batched episode loop (interaction), shared by collect.py, evaluate.py and train_policy.py
# ---------------------------------------------------------------------------------------------
def start(game, split, index, seed, max_steps):
    # each episode has its own random stream, so a resumed run replays random choices exactly
    ep = Episode(game, split, index, random.Random(f"{seed}|{game_id(game)}|{index}"))
    ep.env = make_env(game, max_steps)
    obs, info = ep.env.reset()
    ep.observation, ep.task = split_intro(obs)
    ep.admissible = [a for a in info["admissible_commands"] if a != "help"]
    ep.commands = dict.fromkeys(ep.admissible)  # every command admissible so far, in order (deterministic)
    return ep


def act(ep, output, action, behaviour, seq=None):
    """Apply one agent turn: an action outside the admissible list (or none at all) is recorded as invalid
    and still sent to the engine, which answers with its own feedback ("Nothing happens."). `seq` keeps
    the turn's (prompt_ids, completion_ids) in memory for policy learning."""
    valid = action in ep.admissible
    obs, _, done, info = ep.env.step(action)
    ep.turns.append(dict(observation=ep.observation, output=output, action=action, valid=valid, behaviour=behaviour))
    ep.seqs.append(seq)
    ep.observation = obs.strip()
    ep.admissible = [a for a in info["admissible_commands"] if a != "help"]
    ep.commands.update(dict.fromkeys(ep.admissible))
    ep.won, ep.done = bool(info["won"]), bool(done)


def random_command(ep, invalid_rate):
    """The random policy: uniform over the admissible commands; with probability `invalid_rate` a command
    that was admissible earlier in the episode but is not now ("open drawer 1" once it is open, "take apple 1"
    elsewhere), the kind of invalid action an imperfect agent writes; the engine answers "Nothing happens."."""
    if invalid_rate and ep.rng.random() < invalid_rate:
        stale = [c for c in ep.commands if c not in ep.admissible]
        if stale:
            return ep.rng.choice(stale), "invalid"
    return ep.rng.choice(ep.admissible), "random"


def play_alfworld(jobs, model, tok, settings):
    """Play (game, split, episode index) jobs, B at a time, one batched `sample` per turn; yields each
    finished Episode (ep.job: its position in `jobs`)."""
    pending, active = list(enumerate(jobs)), []
    while pending or active:
        while pending and len(active) < settings.batch_games:
            k, job = pending.pop(0)
            active.append(start(*job, settings.seed, settings.max_steps))
            active[-1].job = k
        coin = [settings.policy == "random" or ep.rng.random() < settings.epsilon for ep in active]
        thinking = [ep for ep, c in zip(active, coin) if not c]
        prompts = [turn_prompt(tok, ep, settings.history, settings.thinking) for ep in thinking]
        outputs = sample(model, tok, prompts, settings.max_new_tokens, settings.temperature, stop=["</action>"])
        by_model = dict(zip(map(id, thinking), outputs))
        for ep, c in zip(active, coin):
            if c:
                act(ep, None, *random_command(ep, settings.invalid_rate))
            else:
                prompt_ids, completion_ids, text = by_model[id(ep)]
                ep.cut += hit_limit(model, tok, completion_ids, settings.max_new_tokens)
                act(ep, text, parse_action(text), "model", (prompt_ids, completion_ids))
        for ep in [ep for ep in active if ep.done]:
            active.remove(ep)
            ep.env.close()
            yield ep


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC: an episode becomes a rollout line and one triplet per turn
# ---------------------------------------------------------------------------------------------
def alfworld_rollout_record(ep, settings):
    return dict(
        env="alfworld",
        game=game_id(ep.game),
        split=ep.split,
        task_type=task_type(ep.game),
        task=ep.task,
        episode=ep.index,
        won=ep.won,
        steps=len(ep.turns),
        invalid=sum(not t["valid"] for t in ep.turns),
        cut_turns=ep.cut,
        turns=ep.turns,
        final_observation=ep.observation,
        policy=settings.policy,
        epsilon=settings.epsilon,
        invalid_rate=settings.invalid_rate,
        model=settings.model if settings.policy == "model" else None,
        seed=settings.seed,
    )


def alfworld_triplet_records(rollout, h):
    """Turn t gives <state: task + last H turns + observation_t, action_t, next_state: observation_{t+1}>."""
    # ---- EXERCISE 11: the interaction triplets (paper Sec. 2.2, Figure 2) ----
    # Eq. triplets: a rollout (s_0, a_0, s_1, a_1, ..., s_T) gives <s_<=t, a_t, s_t+1> for every turn t, in order:
    # s_<=t = the task, the history [[observation, action]] of the (at most) h turns before t, and observation t;
    # s_t+1 = the observation that followed a_t (after the last turn: the rollout's final observation). Each a dict
    # with id "game#episode#t", env, game, task, history, state, action, next_state, valid (the turn's own)
    turns = rollout["turns"]
    next_obs = [t["observation"] for t in turns[1:]] + [rollout["final_observation"]]
    return [
        dict(
            id=f"{rollout['game']}#{rollout['episode']}#{i}",
            env=rollout["env"],
            game=rollout["game"],
            task=rollout["task"],
            history=[[p["observation"], p["action"]] for p in turns[max(0, i - h) : i]],
            state=t["observation"],
            action=t["action"],
            next_state=nxt,
            valid=t["valid"],
        )
        for i, (t, nxt) in enumerate(zip(turns, next_obs))
    ]
    # ---- END EXERCISE 11 ----


# ---------------------------------------------------------------------------------------------
# The environment switch: ALFWorld above, τ²-bench in support/tau2_env.py (imported only when played; TRY NOT TO
# MODIFY)
# ---------------------------------------------------------------------------------------------
def select_games(env, split, n=None, domains=(), tasks=None, first=0):
    """ALFWorld game files of `split`, or τ²-bench task names "domain/id": n of them from the `first`, or the
    named `tasks`."""
    if env == "tau2":
        from support.tau2_env import list_tasks

        games = list_tasks(domains, split, None, tasks)
    else:
        games = list_games(split)
    if first >= len(games):
        fail(f"--first-game {first}: the {split} split has {len(games)} games")
    return games[first:][:n] if n else games[first:]


def play(jobs, model, tok, settings, user=None):
    """Play (game, split, episode index) jobs with the model (or settings.policy); yields finished episodes, in the
    order they finish (ep.job: the episode's position in `jobs`). τ²: `user` is the (model, tokenizer) of the fixed
    local user (settings.user_model "local:MODEL"; loaded when not given)."""
    if settings.env == "tau2":
        from support.tau2_env import play_tau2

        return play_tau2(jobs, model, tok, settings, user)
    return play_alfworld(jobs, model, tok, settings)


def rollout_record(ep, settings):
    if settings.env == "tau2":
        from support.tau2_env import tau2_rollout_record

        return tau2_rollout_record(ep, settings)
    return alfworld_rollout_record(ep, settings)


def triplet_records(rollout, h):
    if rollout["env"] == "tau2":
        from support.tau2_env import tau2_triplet_records

        return tau2_triplet_records(rollout)
    return alfworld_triplet_records(rollout, h)


# ---------------------------------------------------------------------------------------------
# Collection: episodes into rollouts.jsonl, triplets.jsonl and metrics.jsonl, resumable (TRY NOT TO MODIFY)
# ---------------------------------------------------------------------------------------------
def episode_key(game, episode):
    return f"{game}#{episode}"


def open_outputs(out, resume):
    """Open rollouts/triplets/metrics for appending; on resume keep whole episodes only and say which are done."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "rollouts.jsonl", out / "triplets.jsonl", out / "metrics.jsonl"]
    rollouts = resume_jsonl(paths[0], resume, schema=ROLLOUT)
    done = {episode_key(r["game"], r["episode"]) for r in rollouts}
    # triplets of an episode killed before its rollout line was written are dropped: it is replayed
    resume_jsonl(paths[1], resume, keep=lambda t: t["id"].rsplit("#", 1)[0] in done, schema=TRIPLET)
    resume_jsonl(paths[2], resume, keep=lambda m: m["step"] <= len(rollouts), schema=METRICS)
    return [open(p, "a", encoding="utf-8") for p in paths], done, rollouts


def record_episodes(
    games,
    split,
    episodes,
    settings,
    out,
    resume=False,
    model=None,
    tok=None,
    dtype="auto",
    desc="collect",
    plot=True,
    user=None,
    invalid_triplets="keep",
    which=lambda e: True,
):
    """Play `episodes` episodes of each game (those `which` of their index accepts), append them to `out` (and
    plot its metrics.jsonl), and return all rollout records (old and new). Without `model` the model
    settings.model is loaded (only if an episode is left to play by it)."""
    set_seed(settings.seed)
    (f_roll, f_trip, f_metrics), done, rollouts = open_outputs(out, resume)
    name = (lambda g: g) if settings.env == "tau2" else game_id
    # a game's episodes side by side: they start from the same prompt, which lm.sample prefills once
    jobs = [(g, split, e) for g in games for e in range(episodes) if which(e) and episode_key(name(g), e) not in done]
    per_turn = (64_000 if settings.env == "tau2" else 2_000) + 4 * settings.max_new_tokens  # τ² states: policy, tools
    check_disk(
        out, len(jobs) * settings.max_steps * per_turn, f"{len(jobs)} episodes of up to {settings.max_steps} turns"
    )
    if jobs and model is None and settings.policy == "model":
        model, tok = load_model(settings.model, dtype=dtype)
    t0, steps = time.time(), 0
    bar = tqdm(total=len(games) * episodes, initial=len(rollouts), desc=desc, unit="ep")
    for ep in play(jobs, model, tok, settings, user):
        rec = rollout_record(ep, settings)
        triplets = triplet_records(rec, settings.history)
        if invalid_triplets == "drop":  # paper B.1's post-processing: no triplet of an invalid ALFWorld action
            triplets = [t for t in triplets if t.get("valid", True)]
        append_jsonl(f_trip, triplets)  # triplets first: a kill here drops them on resume
        append_jsonl(f_roll, [rec])
        rollouts.append(rec)
        steps += rec["steps"]
        stats = summary(rollouts)
        append_jsonl(
            f_metrics,
            [
                dict(
                    step=len(rollouts),
                    won=float(rec["won"]),
                    steps=rec["steps"],
                    **stats,
                    env_steps_per_s=steps / (time.time() - t0),
                )
            ],
        )
        bar.set_postfix(success=f"{stats['success']:.2f}", invalid=f"{stats['invalid_rate']:.2f}")
        bar.update(1)
    bar.close()
    for f in (f_roll, f_trip, f_metrics):
        f.close()
    if plot:
        plot_metrics(Path(out) / "metrics.jsonl", xlabel="episode")  # a line an episode (`step`: episodes so far)
    return rollouts


def collect(args, model=None, tok=None, desc="collect"):
    """collect.py's run: the episodes its flags name."""
    games = select_games(args.env, args.split, args.games, args.domain, args.tasks, args.first_game)
    if args.policy == "model" and model is None:
        args.batch_games = plan_batch(args, args.model, len(games) * args.episodes)  # --dry-run exits here
    elif args.dry_run:
        print(f"--dry-run: {len(games) * args.episodes} episodes of the random policy: no model to plan for")
        raise SystemExit(0)
    claim_out(args.out, "collect", args.resume)  # the games check out: --out is this run's
    users = getattr(args, "users", None) or [args.user_model]  # τ²: several users share a task's episodes (C.1)
    for k, user in enumerate(users):  # episode e of a task is played with user e mod U, into the same files
        rollouts = record_episodes(
            games,
            args.split,
            args.episodes,
            play_settings(args, user_model=user),
            args.out,
            args.resume or k > 0,
            model,
            tok,
            args.dtype,
            desc,
            invalid_triplets=args.invalid_triplets,
            which=lambda e, k=k: e % len(users) == k,
        )
    return rollouts


def main(args):
    rollouts = collect(args)
    s = summary(rollouts)
    print(
        f"{len(rollouts)} episodes, success {s['success']:.3f}, invalid-action rate {s['invalid_rate']:.3f}, "
        f"mean steps {s['mean_steps']:.1f} -> {args.out}/rollouts.jsonl, triplets.jsonl"
    )
    if "call_turns" in s:  # τ²: how the agent wrote its tool calls (text beside them is kept, as τ² keeps it)
        print(
            f"replies with tool calls {s['call_turns']}: with text beside the calls {s['calls_with_text']}, "
            f"with several calls {s['multi_call_turns']}"
        )
    if cut_warning(s["cut_turn_rate"], "agent turns"):
        print(cut_warning(s["cut_turn_rate"], "agent turns"))
    print(f"next: python train_wm.py --mode split --triplets {args.out}/triplets.jsonl --out ...  (the filter's share)")


if __name__ == "__main__":
    run_stage(main, parse_args())  # Ctrl-C: one line, exit status 130
