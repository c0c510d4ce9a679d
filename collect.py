"""Interaction learning (RWML paper, Sec. 3.1): the agent plays real ALFWorld games or τ²-bench tasks
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
these behaviours give the world model transitions worth learning from. No expert data is used.

τ²-bench (`--env tau2`): the model is the customer-service agent (domain policy and tools in its
prompt, tool calls as <tool_call>{"name", "arguments"}</tool_call>), tau2's Orchestrator runs the
conversation against the real domain database, tau2's user simulator plays the customer (`--user-model
local`: the same local model; or any litellm id, see --help) and tau2's evaluate_simulation scores it.
A triplet's next state is the user's reply or the tool's answer masked to its schema.
"""

import json
import os
import random
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache, partial
from itertools import count, zip_longest
from pathlib import Path

from loguru import logger  # installed with tau2, which logs DEBUG lines from its first import on
from tqdm import tqdm

from checks import check_model, claim_out, at_least, fraction, non_negative, parser
from grpo import TINY_MODEL, append_jsonl, chat_prompt, drop_partial_line, load_model, plot_metrics, read_jsonl, sample, \
    set_seed, write_jsonl
from grpo import generate  # noqa: F401  (evaluate.py reaches grpo through collect.py)

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # tau2 imports litellm: no network for its cost map
logger.disable("tau2")
SPLITS = ("train", "valid_seen", "valid_unseen")
ROLLOUT_FIELDS = ("env", "game", "split", "task_type", "task", "episode", "won", "steps", "invalid", "turns",
                  "policy", "epsilon", "model", "seed")
TURN_FIELDS = ("observation", "output", "action", "valid", "behaviour")
TRIPLET_FIELDS = ("id", "env", "game", "task", "history", "state", "action", "next_state", "valid")


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--env", default="alfworld", choices=["alfworld", "tau2"], help="environment: ALFWorld or τ²-bench")
    p.add_argument("--split", default="train", help=f"ALFWorld split ({', '.join(SPLITS)}); τ²: train or test")
    p.add_argument("--games", type=at_least(), default=None, help="play N games (τ²: tasks) of the split, spread over task types / domains (default: all)")
    p.add_argument("--episodes", type=at_least(), default=3, help="episodes per game (paper: 3)")
    p.add_argument("--max-steps", type=at_least(), default=30, help="agent steps per episode (paper: 30 at evaluation, 15 in ALFWorld policy RL)")
    add_tau2_args(p)
    p.add_argument("--history", type=at_least(0), default=2, help="H: previous (observation, action) turns shown in the state")
    p.add_argument("--policy", default="model", choices=["model", "random"], help="who acts: the model, or uniform over admissible commands")
    p.add_argument("--epsilon", type=fraction(), default=0.0, help="with --policy model: probability of a random admissible command instead")
    p.add_argument("--model", type=check_model, default=TINY_MODEL, help="HF id or local folder (default: SmolLM2-135M-Instruct, offline)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="weights dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--temperature", type=non_negative("0 is greedy"), default=1.0, help="sampling temperature (paper: 1.0 for collection)")
    p.add_argument("--max-new-tokens", type=at_least(), default=256, help="tokens the agent may write per turn")
    p.add_argument("--batch-games", type=at_least(), default=8, help="B: episodes played in parallel, one generate call per turn")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default="runs/collect", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out: keep its whole episodes, play the rest")
    args = p.parse_args(argv)
    if args.env == "tau2" and args.policy == "random":
        p.error("--policy random needs ALFWorld's admissible commands; τ²-bench has none")
    return args


def add_tau2_args(p):
    """The τ²-bench flags, shared by collect.py, train_policy.py and evaluate.py."""
    p.add_argument("--domain", nargs="+", default=["retail", "telecom", "airline"], help=f"τ²-bench domains ({', '.join(TAU2_DOMAINS)})")
    p.add_argument("--tasks", nargs="+", default=None, help="τ²: only these task ids (domain/id, or an id of the first --domain)")
    p.add_argument("--user-model", default="local", help="τ² user simulator: 'local' (the --model itself, batched with the agent) or a "
                   "litellm model id, e.g. gpt-4.1, or openai/<name> with OPENAI_API_BASE=http://host:port/v1 for a local "
                   "OpenAI-compatible server (paper: Qwen3-235B-A22B-Instruct, GPT-4.1)")


def select_games(args):
    """What args name: ALFWorld game files of --split, or τ²-bench task names "domain/id"."""
    if args.env == "tau2":
        return list_tasks(args.domain, args.split, args.games, args.tasks)
    return list_games(args.split, args.games)


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
    if args.env == "tau2":
        yield from play_tau2(jobs, model, tok, args)
        return
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
    if args.env == "tau2":
        return dict(env="tau2", game=ep.game, split=ep.split, task_type=ep.game.split("/")[0], task=ep.task, episode=ep.index,
                    won=ep.won, reward=ep.reward, steps=len(ep.turns), invalid=sum(not t["valid"] for t in ep.turns),
                    termination=ep.termination, reward_info=ep.reward_info, turns=ep.turns, messages=ep.messages,
                    policy="model", epsilon=0.0, model=args.model, user_model=args.user_model, seed=args.seed)
    return dict(env="alfworld", game=game_id(ep.game), split=ep.split, task_type=task_type(ep.game), task=ep.task,
                episode=ep.index, won=ep.won, steps=len(ep.turns), invalid=sum(not t["valid"] for t in ep.turns),
                turns=ep.turns, final_observation=ep.observation, policy=args.policy, epsilon=args.epsilon,
                model=args.model if args.policy == "model" else None, seed=args.seed)


def triplet_records(rollout, h):
    """Turn t gives <state: task + last H turns + observation_t, action_t, next_state: observation_{t+1}>."""
    if rollout["env"] == "tau2":
        return tau2_triplet_records(rollout)
    turns = rollout["turns"]
    next_obs = [t["observation"] for t in turns[1:]] + [rollout["final_observation"]]
    return [dict(id=f"{rollout['game']}#{rollout['episode']}#{i}", env=rollout["env"], game=rollout["game"],
                 task=rollout["task"], history=[[p["observation"], p["action"]] for p in turns[max(0, i - h):i]],
                 state=t["observation"], action=t["action"], next_state=nxt, valid=t["valid"])
            for i, (t, nxt) in enumerate(zip(turns, next_obs))]


# ---------------------------------------------------------------------------------------------
# τ²-bench through the package's own environments, user simulator, Orchestrator and evaluator
# ---------------------------------------------------------------------------------------------
TAU2_DOMAINS = ("retail", "airline", "telecom", "mock")  # mock: tau2's small test domain, for CPU runs
TAU2_MAX_ERRORS = 10  # tau2's default: the episode ends after 10 tool errors
CALL_IDS = count()  # tool-call ids, unique in a process


def tau2():
    """tau2's registry, imported on first use."""
    from tau2.registry import registry
    return registry


@lru_cache(maxsize=None)
def tau2_domain(domain):
    """({task id: Task}, {split: [task ids]} or None (mock has no splits), agent context text) of a domain."""
    if domain not in TAU2_DOMAINS:
        raise SystemExit(f"error: unknown τ²-bench domain {domain!r} (choose from {', '.join(TAU2_DOMAINS)})")
    reg = tau2()
    tasks = {t.id: t for t in reg.get_tasks_loader(domain)()}
    splits = reg.get_task_splits_loader(domain)
    env = reg.get_env_constructor(domain)()
    context = TAU2_CONTEXT.format(policy=env.get_policy().strip(),
                                  tools="\n".join(json.dumps(t.openai_schema) for t in env.get_tools()))
    return tasks, (splits() if splits else None), context


def list_tasks(domains, split, n=None, ids=None):
    """Task names "domain/id" of a split, taking the domains in turn, the first n; or the named `ids`
    ("domain/id", or an id of the first domain)."""
    if ids:
        names = [i if "/" in i else f"{domains[0]}/{i}" for i in ids]
        for name in names:
            domain, _, tid = name.partition("/")
            if tid not in tau2_domain(domain)[0]:
                raise SystemExit(f"error: unknown τ²-bench task {name!r}")
        return names
    per_domain = []
    for d in domains:
        tasks, splits, _ = tau2_domain(d)
        if splits is not None and split not in splits:
            raise SystemExit(f"error: τ²-bench domain {d} has no split {split!r} (choose from {', '.join(splits)})")
        per_domain.append([f"{d}/{i}" for i in (splits[split] if splits else tasks)])
    in_turn = [t for row in zip_longest(*per_domain) for t in row if t]
    return in_turn[:n] if n else in_turn


def user_info(task):
    """The user's basic information that the world model sees (who they are, not what they want)."""
    instructions = task.user_scenario.instructions
    return getattr(instructions, "known_info", None) or task.user_scenario.persona or ""


TAU2_CONTEXT = """Policy:
{policy}

Tools (JSON schemas):
{tools}"""

TAU2_AGENT_PROMPT = """You are a customer service agent. Help the user by following the policy, and use the tools to read and change the company's database.
{context}

Each of your messages either talks to the user or calls one tool, never both. To call a tool, write only
<tool_call>{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}</tool_call>
Otherwise write your message to the user."""


def tool_call_text(call):
    return "<tool_call>" + json.dumps(dict(name=call["name"], arguments=call["arguments"])) + "</tool_call>"


def message_text(m):
    """An agent's or user's message: its tool calls, or else its text."""
    return "".join(tool_call_text(c) for c in m.get("tool_calls") or []) or m["content"]


def say(m):
    """One message of a rollout as a transcript line: the agent's, the user's, or a tool's answer."""
    if m["role"] == "tool":
        return f"Tool {m['name']}: {m['content']}"
    return f"{'Agent' if m['role'] == 'assistant' else 'User'}: {message_text(m)}"


def agent_view(messages):
    """The agent's side of a conversation: the user's tool calls and their results (telecom) are the user's."""
    return [m for m in messages if m.get("requestor", "assistant") == "assistant" and not (m["role"] == "user" and m.get("tool_calls"))]


def conversation(messages):
    return "\n".join(say(m) for m in agent_view(messages)) or "(none)"


def tau2_agent_prompt(tok, ep):
    """The chat-rendered prompt of the agent: policy and tools as the system message, the conversation so far."""
    return chat_prompt(tok, f"The conversation so far:\n{conversation(ep.messages)}\n\nWrite your next message.",
                       system=TAU2_AGENT_PROMPT.format(context=tau2_domain(ep.game.split("/")[0])[2]))


def parse_reply(text, tool_names, requestor="assistant"):
    """A model's message -> (content, tool_calls, valid). <think> is dropped; <tool_call>{"name", "arguments"}
    </tool_call> becomes a tool call. A call that is not JSON, names no known tool or lacks an arguments
    object is an invalid tool call: the text goes to the other side as a message, as a chat API returns
    unparsed text. An empty message is invalid too."""
    from tau2.data_model.message import ToolCall

    text = re.sub(r"<think>.*?(</think>|$)", "", text or "", flags=re.S).strip()
    if "<tool_call>" not in text:
        return text or "(no message)", None, bool(text)
    calls = []
    for block in (re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, flags=re.S)):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return text, None, False
        if not (isinstance(call, dict) and call.get("name") in tool_names and isinstance(call.get("arguments"), dict)):
            return text, None, False
        calls.append(ToolCall(id=f"call_{next(CALL_IDS)}", name=call["name"], arguments=call["arguments"], requestor=requestor))
    return None, calls, True


def tau2_agent(env):
    """The project's model as tau2's agent: the batched loop writes the model's text into `agent.reply`
    before the Orchestrator asks for the next message; the agent turns it into an AssistantMessage."""
    from tau2.agent.base import LocalAgent
    from tau2.data_model.message import AssistantMessage

    class ModelAgent(LocalAgent):
        reply = ""

        def get_init_state(self, message_history=None):
            return None  # the loop keeps the conversation (Episode.messages)

        def set_seed(self, seed):
            pass  # sampling is seeded by the loop

        def generate_next_message(self, message, state):
            content, calls, valid = parse_reply(self.reply, {t.name for t in self.tools})
            return AssistantMessage(role="assistant", content=content, tool_calls=calls,
                                    raw_data=dict(output=self.reply, valid=valid)), state

    return ModelAgent(tools=env.get_tools(), domain_policy=env.get_policy())


def tau2_user(env, task, user_model):
    """tau2's user simulator with the task's scenario: `user_model` is any litellm model id (e.g. gpt-4.1,
    or openai/<name> with OPENAI_API_BASE pointing at a local OpenAI-compatible server); "local" is the
    same prompt and stop signals answered by the project's model through `user.reply`, like the agent."""
    from tau2.data_model.message import MultiToolMessage, ToolMessage, UserMessage
    from tau2.user.base import UserState
    from tau2.user.user_simulator import UserSimulator

    tools = env.get_user_tools() if env.user_tools else None  # telecom: the user acts on their phone
    if user_model != "local":
        return UserSimulator(tools=tools, instructions=str(task.user_scenario), llm=user_model, llm_args=dict(temperature=0.0))

    def chat_message(m):  # a message of the flipped conversation as a chat message
        if isinstance(m, ToolMessage):
            return dict(role="user", content=f"Tool result: {m.content}")
        calls = [dict(name=c.name, arguments=c.arguments) for c in m.tool_calls or []]
        return dict(role=m.role, content="".join(map(tool_call_text, calls)) or m.content)

    class LocalUser(UserSimulator):
        reply = ""

        def set_seed(self, seed):
            pass  # sampling is seeded by the loop

        def prompt(self, tok, message, state):
            """tau2's user-simulator system prompt and the conversation with roles flipped, as chat."""
            incoming = message.tool_messages if isinstance(message, MultiToolMessage) else [message]
            flipped = UserState(system_messages=[], messages=state.messages + incoming).flip_roles()
            system = self.system_prompt
            if self.tools:
                system += ('\n\nYour tools (JSON schemas), called as <tool_call>{"name": ..., "arguments": {...}}</tool_call>:\n'
                           + "\n".join(json.dumps(t.openai_schema) for t in self.tools))
            return chat_prompt(tok, [dict(role="system", content=system)] + [chat_message(m) for m in flipped])

        def generate_next_message(self, message, state):
            state.messages.extend(message.tool_messages if isinstance(message, MultiToolMessage) else [message])
            content, calls, _ = parse_reply(self.reply, {t.name for t in self.tools or []}, requestor="user")
            msg = UserMessage(role="user", content=content, tool_calls=calls)
            state.messages.append(msg)
            return msg, state

    return LocalUser(tools=tools, instructions=str(task.user_scenario))


@dataclass
class Tau2Episode(Episode):
    orch: object = None  # tau2's Orchestrator, stepped by play_tau2
    messages: list = field(default_factory=list)  # the conversation as plain dicts (see message_record)
    reward: float = 0.0
    reward_info: dict = field(default_factory=dict)
    termination: str = ""


def start_tau2(name, split, index, seed, user_model):
    from tau2.orchestrator.orchestrator import Orchestrator

    domain, _, tid = name.partition("/")
    task = tau2_domain(domain)[0][tid]
    env = tau2().get_env_constructor(domain)()
    ep = Tau2Episode(name, split, index, random.Random(f"{seed}|{name}|{index}"), task=user_info(task))
    ep.orch = Orchestrator(domain, tau2_agent(env), tau2_user(env, task, user_model), env, task, seed=seed,
                           max_steps=10**6, max_errors=TAU2_MAX_ERRORS)  # the loop checks the limits (see step_tau2)
    ep.orch.initialize()
    ep.messages = [message_record(m, {}) for m in ep.orch.trajectory]
    return ep


def message_record(m, call_names):
    """A tau2 message as a plain dict for rollouts.jsonl (a tool's answer carries the tool's name)."""
    rec = dict(role=m.role, content=m.content)
    if getattr(m, "tool_calls", None):
        rec["tool_calls"] = [dict(name=c.name, arguments=c.arguments) for c in m.tool_calls]
    if m.role == "tool":
        rec.update(name=call_names.get(m.id, ""), requestor=m.requestor, error=m.error)
    if m.role == "assistant" and m.raw_data and "output" in m.raw_data:  # written by the model (not the greeting)
        rec.update(output=m.raw_data["output"], valid=m.raw_data["valid"])
    return rec


def step_tau2(ep, max_steps, seq=None):
    """One Orchestrator step (agent, user or environment), then the limits of Orchestrator.run: the episode
    ends before the agent's (max_steps + 1)-th message or after TAU2_MAX_ERRORS tool errors; a finished
    episode is scored by tau2's evaluate_simulation."""
    from tau2.data_model.simulation import SimulationRun, TerminationReason
    from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation
    from tau2.orchestrator.orchestrator import Role

    o = ep.orch
    agent_turn = o.to_role == Role.AGENT
    seen = len(o.trajectory)
    o.step()
    names = {c.id: c.name for c in getattr(o.trajectory[seen - 1], "tool_calls", None) or []}  # what tool answers answer
    ep.messages += [message_record(m, names) for m in o.trajectory[seen:]]
    if agent_turn:
        m = ep.messages[-1]
        ep.turns.append(dict(output=m["output"], action=message_text(m), valid=m["valid"]))
        ep.seqs.append(seq)
    if not o.done and o.to_role == Role.AGENT and len(ep.turns) >= max_steps:
        o.done, o.termination_reason = True, TerminationReason.MAX_STEPS
    if not o.done and o.to_role != Role.ENV and o.num_errors >= TAU2_MAX_ERRORS:
        o.done, o.termination_reason = True, TerminationReason.TOO_MANY_ERRORS
    if o.done:
        domain = ep.game.split("/")[0]
        sim = SimulationRun(id=f"{ep.game}#{ep.index}", task_id=o.task.id, start_time="", end_time="", duration=0.0,
                            termination_reason=o.termination_reason, messages=o.get_trajectory())
        info = evaluate_simulation(simulation=sim, task=o.task, evaluation_type=EvaluationType.ALL, solo_mode=False, domain=domain)
        ep.reward, ep.won, ep.done = info.reward, info.reward >= 1 - 1e-6, True
        ep.termination = o.termination_reason.value
        ep.reward_info = dict(reward=info.reward, reward_breakdown={k.value: v for k, v in (info.reward_breakdown or {}).items()},
                              note=info.info.get("note") if info.info else None)


def play_tau2(jobs, model, tok, args):
    """Play ("domain/id", split, episode index) jobs, B at a time: every Orchestrator is stepped in lockstep,
    and every agent (and local user) message of a step comes from one batched `sample`; yields each finished
    Episode."""
    from tau2.orchestrator.orchestrator import Role

    pending, active = list(jobs), []
    while pending or active:
        while pending and len(active) < args.batch_games:
            active.append(start_tau2(*pending.pop(0), args.seed, args.user_model))
        agents = [ep for ep in active if ep.orch.to_role == Role.AGENT]
        users = [ep for ep in active if ep.orch.to_role == Role.USER and args.user_model == "local"]
        prompts = [tau2_agent_prompt(tok, ep) for ep in agents] + [ep.orch.user.prompt(tok, ep.orch.message, ep.orch.user_state) for ep in users]
        outputs = sample(model, tok, prompts, args.max_new_tokens, args.temperature, stop=["</tool_call>"])
        seqs = {}
        for ep, (prompt_ids, completion_ids, text) in zip(agents + users, outputs):
            if ep.orch.to_role == Role.AGENT:
                ep.orch.agent.reply, seqs[id(ep)] = text, (prompt_ids, completion_ids)
            else:
                ep.orch.user.reply = text
        for ep in active:
            step_tau2(ep, args.max_steps, seqs.get(id(ep)))
        for ep in [ep for ep in active if ep.done]:
            active.remove(ep)
            yield ep


def mask_json(text):
    """A tool's answer with every value replaced by its type (keys and structure stay), the world model's
    target for tool calls (paper, τ²-bench). Text that is not JSON (a bare string value) is "str"."""
    def mask(v):
        if isinstance(v, dict):
            return {k: mask(x) for k, x in v.items()}
        if isinstance(v, list):
            return [mask(x) for x in v]
        return "null" if v is None else type(v).__name__  # bool, int, float, str
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return "str"
    return json.dumps(mask(value))


def tau2_triplet_records(rollout):
    """Agent message t gives <state: policy, tools, the user's basic information and the conversation so far,
    action: the message or tool call, next_state: the user's reply (kind "user") or the tool's answer masked
    to its schema (kind "tool"; an error stays as it is)>."""
    msgs, out = rollout["messages"], []
    domain = rollout["game"].split("/")[0]
    for i, m in enumerate(msgs):
        if "output" not in m:
            continue  # the Orchestrator's greeting is not the model's
        after = agent_view(msgs[i + 1:])
        if m.get("tool_calls"):
            answers = [a for a in after[:len(m["tool_calls"])] if a["role"] == "tool"]
            kind, nxt = "tool", "\n".join(a["content"] if a["error"] else mask_json(a["content"]) for a in answers)
        else:
            replies = [a for a in after if a["role"] == "user"][:1]
            kind, nxt = "user", replies[0]["content"] if replies else ""
        if not nxt:
            continue  # the episode ended before an answer
        state = (f"{tau2_domain(domain)[2]}\n\nUser information: {rollout['task'] or '(none)'}\n\n"
                 f"The conversation so far:\n{conversation(msgs[:i])}")
        out.append(dict(id=f"{rollout['game']}#{rollout['episode']}#{len(out)}", env="tau2", game=rollout["game"],
                        task=rollout["task"], history=[], state=state, action=message_text(m), next_state=nxt,
                        kind=kind, valid=m["valid"]))
    return out


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
    games = select_games(args)
    set_seed(args.seed)
    (f_roll, f_trip, f_metrics), done, rollouts = open_outputs(args.out, args.resume)
    name = (lambda g: g) if args.env == "tau2" else game_id
    jobs = [(g, args.split, e) for e in range(args.episodes) for g in games if episode_key(name(g), e) not in done]
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
    claim_out(args.out, "collect", args.resume)
    rollouts = collect(args)
    s = summary(rollouts)
    print(f"{len(rollouts)} episodes, success {s['success']:.3f}, invalid-action rate {s['invalid_rate']:.3f}, "
          f"mean steps {s['mean_steps']:.1f} -> {args.out}/rollouts.jsonl, triplets.jsonl")
