"""Interaction learning (RWML paper, Sec. 3.1): the agent plays real ALFWorld games and every turn
becomes a triplet <state, action, next state> for world-model learning.

    python collect.py --split train --games 20 --episodes 3 --out runs/collect

Writes, in --out:
  rollouts.jsonl   one episode a line (every turn's observation, raw model output, action, validity)
  triplets.jsonl   one turn a line (task, last H turns of history, state, action, next_state)
  metrics.jsonl    running success / invalid-action rate per finished episode (+ metrics.png)

The acting policy is the model itself (the paper's self-play). `--policy random` samples uniformly
from the admissible commands instead, and `--epsilon e` lets the model act but takes a random
admissible command with probability e: a tiny model writes almost no admissible action, so on CPU
these behaviours give the world model transitions worth learning from. No expert data is used.
"""

import argparse
import os
import random
import re
import time
from dataclasses import dataclass, field
from functools import partial
from itertools import zip_longest
from pathlib import Path

from tqdm import tqdm

from grpo import TINY_MODEL, append_jsonl, chat_prompt, drop_partial_line, load_model, plot_metrics, read_jsonl, sample, \
    set_seed, write_jsonl
from grpo import generate  # noqa: F401  (evaluate.py reaches grpo through collect.py)

SPLITS = ("train", "valid_seen", "valid_unseen")
ROLLOUT_FIELDS = ("env", "game", "split", "task_type", "task", "episode", "won", "steps", "invalid", "turns",
                  "policy", "epsilon", "model", "seed")
TURN_FIELDS = ("observation", "output", "action", "valid", "behaviour")
TRIPLET_FIELDS = ("id", "env", "game", "task", "history", "state", "action", "next_state", "valid")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--env", default="alfworld", choices=["alfworld"], help="environment")
    p.add_argument("--split", default="train", help=f"ALFWorld split: one of {', '.join(SPLITS)}")
    p.add_argument("--games", type=int, default=None, help="play N games of the split, spread over its task types (default: all)")
    p.add_argument("--episodes", type=int, default=3, help="episodes per game (paper: 3)")
    p.add_argument("--max-steps", type=int, default=30, help="steps per episode (paper: 30 at evaluation, 15 in policy RL)")
    p.add_argument("--history", type=int, default=2, help="H: previous (observation, action) turns shown in the state")
    p.add_argument("--policy", default="model", choices=["model", "random"], help="who acts: the model, or uniform over admissible commands")
    p.add_argument("--epsilon", type=float, default=0.0, help="with --policy model: probability of a random admissible command instead")
    p.add_argument("--model", default=TINY_MODEL, help="HF id or local folder (default: SmolLM2-135M-Instruct, offline)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="weights dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (paper: 1.0 for collection)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens the agent may write per turn")
    p.add_argument("--batch-games", type=int, default=8, help="B: episodes played in parallel, one generate call per turn")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default="runs/collect", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out: keep its whole episodes, play the rest")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# ALFWorld through the package's own TextWorld env and wrappers (TRY NOT TO MODIFY)
# ---------------------------------------------------------------------------------------------
def alfworld_data():
    """ALFWORLD_DATA, or ../shared/alfworld beside the project when unset; a one-line error if absent."""
    root = os.environ.get("ALFWORLD_DATA") or str(Path(__file__).resolve().parent.parent / "shared" / "alfworld")
    if not (Path(root) / "json_2.1.1").is_dir():
        raise SystemExit(f"error: ALFWorld data not found: {root}/json_2.1.1 is missing (set ALFWORLD_DATA)")
    os.environ["ALFWORLD_DATA"] = root
    return Path(root)


def list_games(split, n=None):
    """The split's game files in a fixed order that takes the six task types in turn, the first n of them
    (so that a small subset covers every task type)."""
    if split not in SPLITS:
        raise SystemExit(f"error: unknown ALFWorld split {split!r} (choose from {', '.join(SPLITS)})")
    root = alfworld_data()
    games = sorted(glob_games(root / "json_2.1.1" / split))
    if not games:
        raise SystemExit(f"error: no games in {root}/json_2.1.1/{split}")
    by_type = {}
    for g in games:
        by_type.setdefault(task_type(g), []).append(g)
    in_turn = [g for row in zip_longest(*by_type.values()) for g in row if g]
    return in_turn[:n] if n else in_turn


def glob_games(folder):
    return [str(p) for p in Path(folder).glob("*/*/game.tw-pddl")]


def game_id(game_file):
    """A game's name in the records: its folder relative to ALFWORLD_DATA."""
    return str(Path(game_file).parent.relative_to(alfworld_data()))


def task_type(game_file):
    # the task folder is named "<task type>-<object>-...", e.g. pick_and_place_simple-Pencil-None-Shelf-308
    return Path(game_file).parent.parent.name.split("-")[0]


def make_env(game_file, max_steps, expert=False):
    """A TextWorld gym env for one game with ALFWorld's wrappers (admissible commands, `won`); with
    `expert`, info["extra.expert_plan"] holds the PDDL planner's next command (resets take seconds
    longer; ALFWorld's hand-coded expert loops on some games, the planner wins them)."""
    import textworld
    import textworld.gym
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredInfos

    infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile", "expert_plan"] if expert else [])
    wrappers = [AlfredDemangler(shuffle=False), AlfredInfos] + ([partial(AlfredExpert, expert_type="planner")] if expert else [])
    return textworld.gym.make(textworld.gym.register_games([game_file], infos, max_episode_steps=max_steps, wrappers=wrappers))


def split_intro(obs):
    """The first observation holds a banner, the room and the task: return (room, task)."""
    obs = obs.split("=-", 1)[-1].strip() if obs.startswith("-=") else obs.strip()
    room, _, task = obs.partition("Your task is to: ")
    return room.strip(), task.strip()


# ---------------------------------------------------------------------------------------------
# The agent: prompt and action parsing (ALGO LOGIC: the policy's input and output format)
# ---------------------------------------------------------------------------------------------
AGENT_PROMPT = """You are an expert agent operating in the ALFRED Embodied Environment.
Your task is to: {task}
Prior to this step, you have already taken {step} step(s). Below are the most recent {h} observations and the corresponding actions you took:
{history}
You are now at step {next_step} and your current observation is: {observation}
Your admissible actions of the current situation are: [{admissible}].

Now it's your turn to take an action. You should first reason step-by-step about the current situation. This reasoning process MUST be enclosed within <think> </think> tags.
Once you've finished your reasoning, you should choose an admissible action for the current step and present it within <action> </action> tags."""


def format_history(history):
    """[(observation, action), ...] as numbered lines; the same text in the agent's and the world model's prompt."""
    if not history:
        return "(none)"
    return "\n".join(f"[Observation: {o!r}, Action: {a!r}]" for o, a in history)


def agent_prompt(task, history, observation, admissible, step, h):
    return AGENT_PROMPT.format(task=task, step=step, h=min(h, len(history)), history=format_history(history[-h:] if h else []),
                               next_step=step + 1, observation=observation,
                               admissible=", ".join(f"'{a}'" for a in admissible))


def turn_prompt(tok, ep, h):
    """The chat-rendered prompt the agent sees at an episode's current turn."""
    return chat_prompt(tok, agent_prompt(ep.task, [(t["observation"], t["action"]) for t in ep.turns], ep.observation,
                                         ep.admissible, len(ep.turns), h))


def parse_action(text):
    """The last <action>...</action> of a model output, normalised like ALFWorld commands; "" without tags."""
    found = re.findall(r"<action>(.*?)</action>", text, flags=re.S)
    return " ".join(found[-1].lower().split()) if found else ""


# ---------------------------------------------------------------------------------------------
# The batched episode loop, shared by collect.py, evaluate.py and train_policy.py
# ---------------------------------------------------------------------------------------------
@dataclass
class Episode:
    game: str
    split: str
    index: int  # episode number of this game
    rng: random.Random
    env: object = None
    task: str = ""
    observation: str = ""
    admissible: list = field(default_factory=list)
    turns: list = field(default_factory=list)
    seqs: list = field(default_factory=list)  # per turn: (prompt_ids, completion_ids) the model wrote, None for a random turn
    won: bool = False
    done: bool = False


def start(game, split, index, seed, max_steps):
    # each episode has its own random stream, so a resumed run replays random choices exactly
    ep = Episode(game, split, index, random.Random(f"{seed}|{game_id(game)}|{index}"))
    ep.env = make_env(game, max_steps)
    obs, info = ep.env.reset()
    ep.observation, ep.task = split_intro(obs)
    ep.admissible = [a for a in info["admissible_commands"] if a != "help"]
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
    ep.won, ep.done = bool(info["won"]), bool(done)


def play(jobs, model, tok, args):
    """Play (game, split, episode index) jobs, B at a time, one batched `sample` per turn; yields each
    finished Episode."""
    pending, active = list(jobs), []
    while pending or active:
        while pending and len(active) < args.batch_games:
            active.append(start(*pending.pop(0), args.seed, args.max_steps))
        coin = [args.policy == "random" or ep.rng.random() < args.epsilon for ep in active]
        thinking = [ep for ep, c in zip(active, coin) if not c]
        prompts = [turn_prompt(tok, ep, args.history) for ep in thinking]
        outputs = sample(model, tok, prompts, args.max_new_tokens, args.temperature, stop=["</action>"])
        by_model = dict(zip(map(id, thinking), outputs))
        for ep, c in zip(active, coin):
            if c:
                act(ep, None, ep.rng.choice(ep.admissible), "random")
            else:
                prompt_ids, completion_ids, text = by_model[id(ep)]
                act(ep, text, parse_action(text), "model", (prompt_ids, completion_ids))
        for ep in [ep for ep in active if ep.done]:
            active.remove(ep)
            ep.env.close()
            yield ep


# ---------------------------------------------------------------------------------------------
# Records: an episode becomes a rollout line and one triplet per turn
# ---------------------------------------------------------------------------------------------
def rollout_record(ep, args):
    return dict(env="alfworld", game=game_id(ep.game), split=ep.split, task_type=task_type(ep.game), task=ep.task,
                episode=ep.index, won=ep.won, steps=len(ep.turns), invalid=sum(not t["valid"] for t in ep.turns),
                turns=ep.turns, final_observation=ep.observation, policy=args.policy, epsilon=args.epsilon,
                model=args.model if args.policy == "model" else None, seed=args.seed)


def triplet_records(rollout, h):
    """Turn t gives <state: task + last H turns + observation_t, action_t, next_state: observation_{t+1}>."""
    turns = rollout["turns"]
    next_obs = [t["observation"] for t in turns[1:]] + [rollout["final_observation"]]
    return [dict(id=f"{rollout['game']}#{rollout['episode']}#{i}", env=rollout["env"], game=rollout["game"],
                 task=rollout["task"], history=[[p["observation"], p["action"]] for p in turns[max(0, i - h):i]],
                 state=t["observation"], action=t["action"], next_state=nxt, valid=t["valid"])
            for i, (t, nxt) in enumerate(zip(turns, next_obs))]


def episode_key(game, episode):
    return f"{game}#{episode}"


def open_outputs(out, resume):
    """Open rollouts/triplets/metrics for appending; on resume keep whole episodes only and say which are done."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "rollouts.jsonl", out / "triplets.jsonl", out / "metrics.jsonl"]
    done, rollouts = set(), []
    if resume:
        for p in paths:
            drop_partial_line(p)
        rollouts = read_jsonl(paths[0], required=ROLLOUT_FIELDS) if paths[0].exists() else []
        done = {episode_key(r["game"], r["episode"]) for r in rollouts}
        # triplets of an episode killed before its rollout line was written are dropped: it is replayed
        triplets = read_jsonl(paths[1], required=TRIPLET_FIELDS) if paths[1].exists() else []
        write_jsonl(paths[1], [t for t in triplets if t["id"].rsplit("#", 1)[0] in done])
        write_jsonl(paths[2], (read_jsonl(paths[2]) if paths[2].exists() else [])[:len(rollouts)])
    else:
        for p in paths:
            p.unlink(missing_ok=True)
    return [open(p, "a", encoding="utf-8") for p in paths], done, rollouts


def summary(rollouts):
    n = max(1, len(rollouts))
    turns = max(1, sum(r["steps"] for r in rollouts))
    return dict(success=sum(r["won"] for r in rollouts) / n, invalid_rate=sum(r["invalid"] for r in rollouts) / turns,
                mean_steps=sum(r["steps"] for r in rollouts) / n)


def collect(args, model=None, tok=None, desc="collect"):
    """Run the episodes of `args`, append them to --out, and return all rollout records (old and new)."""
    games = list_games(args.split, args.games)
    set_seed(args.seed)
    (f_roll, f_trip, f_metrics), done, rollouts = open_outputs(args.out, args.resume)
    jobs = [(g, args.split, e) for e in range(args.episodes) for g in games if episode_key(game_id(g), e) not in done]
    if jobs and model is None and args.policy == "model":
        model, tok = load_model(args.model, dtype=args.dtype)
    t0, steps = time.time(), 0
    bar = tqdm(total=len(games) * args.episodes, initial=len(rollouts), desc=desc, unit="ep")
    for ep in play(jobs, model, tok, args):
        rec = rollout_record(ep, args)
        append_jsonl(f_trip, triplet_records(rec, args.history))  # triplets first: a kill here drops them on resume
        append_jsonl(f_roll, [rec])
        rollouts.append(rec)
        steps += rec["steps"]
        stats = summary(rollouts)
        append_jsonl(f_metrics, [dict(step=len(rollouts), won=float(rec["won"]), steps=rec["steps"], **stats,
                                      env_steps_per_s=steps / (time.time() - t0))])
        bar.set_postfix(success=f"{stats['success']:.2f}", invalid=f"{stats['invalid_rate']:.2f}")
        bar.update(1)
    bar.close()
    for f in (f_roll, f_trip, f_metrics):
        f.close()
    plot_metrics(Path(args.out) / "metrics.jsonl")
    return rollouts


if __name__ == "__main__":
    args = parse_args()
    rollouts = collect(args)
    s = summary(rollouts)
    print(f"{len(rollouts)} episodes, success {s['success']:.3f}, invalid-action rate {s['invalid_rate']:.3f}, "
          f"mean steps {s['mean_steps']:.1f} -> {args.out}/rollouts.jsonl, triplets.jsonl")
