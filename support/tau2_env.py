"""τ²-bench through the package's own environments, user simulator, Orchestrator and evaluator: the adapter
that lets collect.py, train_policy.py and evaluate.py play its tasks (collect.py imports it only for --env tau2).

The model is the customer-service agent (domain policy and tools in its prompt, tool calls as
<tool_call>{"name", "arguments"}</tool_call>); tau2's Orchestrator runs the conversation against the real
domain database, tau2's user simulator plays the customer (`--user-model local`: the played model itself;
`local:MODEL`: one fixed local model, loaded once, at τ²'s user temperature; or any litellm id) and tau2's
evaluate_simulation scores it. A triplet's next state is the user's reply or the
tool's answer masked to its schema.
"""

import json
import os
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import count, zip_longest

os.environ.setdefault(
    "LITELLM_LOCAL_MODEL_COST_MAP", "True"
)  # before tau2, which imports litellm: no network for its cost map
from loguru import logger  # installed with tau2, which logs DEBUG lines from its first import on

logger.disable("tau2")
from tau2.agent.base import LocalAgent
from tau2.config import DEFAULT_LLM_TEMPERATURE_USER
from tau2.data_model.message import AssistantMessage, MultiToolMessage, ToolCall, ToolMessage, UserMessage
from tau2.data_model.simulation import SimulationRun, TerminationReason
from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation
from tau2.orchestrator.orchestrator import Orchestrator, Role
from tau2.registry import registry
from tau2.user.base import UserState
from tau2.user.user_simulator import UserSimulator

from support.checks import fail
from support.episode import Episode
from support.lm import chat_prompt, hit_limit, load_model, sample, strip_thinking

TAU2_DOMAINS = ("retail", "airline", "telecom", "mock")  # mock: tau2's small test domain, for CPU runs
TAU2_MAX_ERRORS = 10  # tau2's default: the episode ends after 10 tool errors
USER_TEMPERATURE = DEFAULT_LLM_TEMPERATURE_USER  # tau2's runs sample their user simulator at 0.0
CALL_IDS = count()  # tool-call ids, unique in a process


@lru_cache(maxsize=None)
def tau2_domain(domain):
    """({task id: Task}, {split: [task ids]} or None (mock has no splits), agent context text) of a domain."""
    if domain not in TAU2_DOMAINS:
        fail(f"unknown τ²-bench domain {domain!r} (choose from {', '.join(TAU2_DOMAINS)})")
    reg = registry
    tasks = {t.id: t for t in reg.get_tasks_loader(domain)()}
    splits = reg.get_task_splits_loader(domain)
    env = reg.get_env_constructor(domain)()
    context = TAU2_CONTEXT.format(
        policy=env.get_policy().strip(), tools="\n".join(json.dumps(t.openai_schema) for t in env.get_tools())
    )
    return tasks, (splits() if splits else None), context


def list_tasks(domains, split, n=None, ids=None):
    """Task names "domain/id" of a split, taking the domains in turn, the first n; or the named `ids`
    ("domain/id", or an id of the first domain), each once, each in its own domain."""
    if ids:
        names = list(dict.fromkeys(i if "/" in i else f"{domains[0]}/{i}" for i in ids))
        for name in names:
            domain, _, tid = name.partition("/")
            if domain not in domains:
                fail(f"τ²-bench task {name!r} is not in --domain {' '.join(domains)}")
            if tid not in tau2_domain(domain)[0]:
                fail(f"unknown τ²-bench task {name!r}")
        return names[:n] if n else names
    per_domain = []
    for d in domains:
        tasks, splits, _ = tau2_domain(d)
        if splits is not None and split not in splits:
            fail(f"τ²-bench domain {d} has no split {split!r} (choose from {', '.join(splits)})")
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

TAU2_AGENT_PROMPT = """You are a customer service agent. Help the user by following the policy, and use the \
tools to read and change the company's database.
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
    return [
        m
        for m in messages
        if m.get("requestor", "assistant") == "assistant" and not (m["role"] == "user" and m.get("tool_calls"))
    ]


def conversation(messages):
    return "\n".join(say(m) for m in agent_view(messages)) or "(none)"


def tau2_agent_prompt(tok, ep):
    """The chat-rendered prompt of the agent: policy and tools as the system message, the conversation so far."""
    return chat_prompt(
        tok,
        f"The conversation so far:\n{conversation(ep.messages)}\n\nWrite your next message.",
        system=TAU2_AGENT_PROMPT.format(context=tau2_domain(ep.game.split("/")[0])[2]),
    )


def parse_reply(text, tool_names, requestor="assistant"):
    """A model's message -> (content, tool_calls, valid). Its thinking is dropped (`strip_thinking`: a think
    block left open leaves no message); <tool_call>{"name", "arguments"}
    </tool_call> becomes a tool call. A call that is not JSON, names no known tool or lacks an arguments
    object (or whose name is not a string) is an invalid tool call: the text goes to the other side as a
    message, as a chat API returns unparsed text. An empty message is invalid too: no reply ends a run."""

    text = strip_thinking(text or "").strip()
    if "<tool_call>" not in text:
        return text or "(no message)", None, bool(text)
    calls = []
    for block in re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, flags=re.S):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return text, None, False
        name = call.get("name") if isinstance(call, dict) else None
        if not (isinstance(name, str) and name in tool_names and isinstance(call.get("arguments"), dict)):
            return text, None, False
        calls.append(
            ToolCall(id=f"call_{next(CALL_IDS)}", name=call["name"], arguments=call["arguments"], requestor=requestor)
        )
    return None, calls, True


class ModelAgent(LocalAgent):
    """The project's model as tau2's agent: the batched loop writes the model's text into `reply` before the
    Orchestrator asks for the next message; the agent turns it into an AssistantMessage."""

    reply = ""

    def get_init_state(self, message_history=None):
        return None  # the loop keeps the conversation (Episode.messages)

    def set_seed(self, seed):
        pass  # sampling is seeded by the loop

    def generate_next_message(self, message, state):
        content, calls, valid = parse_reply(self.reply, {t.name for t in self.tools})
        return AssistantMessage(
            role="assistant", content=content, tool_calls=calls, raw_data=dict(output=self.reply, valid=valid)
        ), state


def flipped_chat_message(m):
    """A message of the user's flipped conversation as a chat message (tool results and calls as text)."""
    if isinstance(m, ToolMessage):
        return dict(role="user", content=f"Tool result: {m.content}")
    calls = [dict(name=c.name, arguments=c.arguments) for c in m.tool_calls or []]
    return dict(role=m.role, content="".join(map(tool_call_text, calls)) or m.content)


class LocalUser(UserSimulator):
    """tau2's user simulator answered by the project's model: tau2's own system prompt and stop signals, the
    model's text written into `reply` by the batched loop, as for the agent."""

    reply = ""

    def set_seed(self, seed):
        pass  # sampling is seeded by the loop

    def prompt(self, tok, message, state):
        """tau2's user-simulator system prompt and the conversation with roles flipped, as chat."""
        incoming = message.tool_messages if isinstance(message, MultiToolMessage) else [message]
        flipped = UserState(system_messages=[], messages=state.messages + incoming).flip_roles()
        system = self.system_prompt
        if self.tools:
            system += (
                '\n\nYour tools (JSON schemas), called as <tool_call>{"name": ..., "arguments": {...}}</tool_call>:\n'
                + "\n".join(json.dumps(t.openai_schema) for t in self.tools)
            )
        return chat_prompt(tok, [dict(role="system", content=system)] + [flipped_chat_message(m) for m in flipped])

    def generate_next_message(self, message, state):
        state.messages.extend(message.tool_messages if isinstance(message, MultiToolMessage) else [message])
        content, calls, _ = parse_reply(self.reply, {t.name for t in self.tools or []}, requestor="user")
        msg = UserMessage(role="user", content=content, tool_calls=calls)
        state.messages.append(msg)
        return msg, state


def load_user(user_model, dtype="auto"):
    """(model, tokenizer) of a fixed local user `local:MODEL`, loaded once and never trained; None for "local"
    (the played model is its own user) and for a litellm id."""
    if not user_model.startswith("local:"):
        return None
    model, tok = load_model(user_model.removeprefix("local:"), dtype=dtype)
    return model.eval().requires_grad_(False), tok


def tau2_user(env, task, user_model):
    """tau2's user simulator with the task's scenario: `user_model` is any litellm model id (e.g. gpt-4.1,
    or openai/<name> with OPENAI_API_BASE pointing at a local OpenAI-compatible server), sampled at τ²'s user
    temperature; "local" / "local:MODEL" is the same prompt and stop signals answered by a local model
    (LocalUser): the played model, or one fixed model."""
    tools = env.get_user_tools() if env.user_tools else None  # telecom: the user acts on their phone
    if not user_model.startswith("local"):
        return UserSimulator(
            tools=tools,
            instructions=str(task.user_scenario),
            llm=user_model,
            llm_args=dict(temperature=USER_TEMPERATURE),
        )
    return LocalUser(tools=tools, instructions=str(task.user_scenario))


@dataclass
class Tau2Episode(Episode):
    orch: object = None  # tau2's Orchestrator, stepped by play_tau2
    messages: list = field(default_factory=list)  # the conversation as plain dicts (see message_record)
    reward: float = 0.0
    reward_info: dict = field(default_factory=dict)
    termination: str = ""


def start_tau2(name, split, index, seed, user_model):

    domain, _, tid = name.partition("/")
    task = tau2_domain(domain)[0][tid]
    env = registry.get_env_constructor(domain)()
    ep = Tau2Episode(name, split, index, random.Random(f"{seed}|{name}|{index}"), task=user_info(task))
    ep.orch = Orchestrator(
        domain,
        ModelAgent(tools=env.get_tools(), domain_policy=env.get_policy()),
        tau2_user(env, task, user_model),
        env,
        task,
        seed=seed,
        max_steps=10**6,
        max_errors=TAU2_MAX_ERRORS,
    )  # the loop checks the limits (see step_tau2)
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
    """One Orchestrator step (agent, user or environment), then the limits of Orchestrator.run, as τ² applies
    them: the episode ends after max_steps orchestrator steps (every message; τ²'s runs: 200) or
    TAU2_MAX_ERRORS tool errors, checked when no tool is to answer; a finished episode is scored by tau2's
    evaluate_simulation."""

    o = ep.orch
    agent_turn = o.to_role == Role.AGENT
    seen = len(o.trajectory)
    o.step()
    names = {
        c.id: c.name for c in getattr(o.trajectory[seen - 1], "tool_calls", None) or []
    }  # what tool answers answer
    ep.messages += [message_record(m, names) for m in o.trajectory[seen:]]
    if agent_turn:
        m = ep.messages[-1]
        ep.turns.append(dict(output=m["output"], action=message_text(m), valid=m["valid"]))
        ep.seqs.append(seq)
    if not o.done and o.to_role != Role.ENV and o.step_count >= max_steps:
        o.done, o.termination_reason = True, TerminationReason.MAX_STEPS
    if not o.done and o.to_role != Role.ENV and o.num_errors >= TAU2_MAX_ERRORS:
        o.done, o.termination_reason = True, TerminationReason.TOO_MANY_ERRORS
    if o.done:
        domain = ep.game.split("/")[0]
        sim = SimulationRun(
            id=f"{ep.game}#{ep.index}",
            task_id=o.task.id,
            start_time="",
            end_time="",
            duration=0.0,
            termination_reason=o.termination_reason,
            messages=o.get_trajectory(),
        )
        info = evaluate_simulation(
            simulation=sim, task=o.task, evaluation_type=EvaluationType.ALL, solo_mode=False, domain=domain
        )
        ep.reward, ep.won, ep.done = info.reward, info.reward >= 1 - 1e-6, True
        ep.termination = o.termination_reason.value
        ep.reward_info = dict(
            reward=info.reward,
            reward_breakdown={k.value: v for k, v in (info.reward_breakdown or {}).items()},
            note=info.info.get("note") if info.info else None,
        )


def play_tau2(jobs, model, tok, settings, user=None):
    """Play ("domain/id", split, episode index) jobs, B at a time: every Orchestrator is stepped in lockstep,
    and every agent (and "local" user) message of a step comes from one batched `sample`; a fixed local user
    (`user`: (model, tokenizer) of settings.user_model "local:MODEL") answers in a batch of its own, at τ²'s
    user temperature. Yields each finished Episode."""
    if settings.user_model.startswith("local:") and user is None:
        user = load_user(settings.user_model)

    pending, active = list(enumerate(jobs)), []
    while pending or active:
        while pending and len(active) < settings.batch_games:
            k, job = pending.pop(0)
            active.append(start_tau2(*job, settings.seed, settings.user_model))
            active[-1].job = k
        agents = [ep for ep in active if ep.orch.to_role == Role.AGENT]
        users = [ep for ep in active if ep.orch.to_role == Role.USER and settings.user_model.startswith("local")]
        selves = [] if user else users  # "local": the played model answers as the user, in the agents' batch
        prompts = [tau2_agent_prompt(tok, ep) for ep in agents] + [
            ep.orch.user.prompt(tok, ep.orch.message, ep.orch.user_state) for ep in selves
        ]
        outputs = sample(model, tok, prompts, settings.max_new_tokens, settings.temperature, stop=["</tool_call>"])
        if user and users:  # one fixed user for every episode
            outputs += sample(
                *user,
                [ep.orch.user.prompt(user[1], ep.orch.message, ep.orch.user_state) for ep in users],
                settings.max_new_tokens,
                USER_TEMPERATURE,
                stop=["</tool_call>"],
            )
        seqs = {}
        for ep, (prompt_ids, completion_ids, text) in zip(agents + users, outputs):
            if ep.orch.to_role == Role.AGENT:
                ep.orch.agent.reply, seqs[id(ep)] = text, (prompt_ids, completion_ids)
                ep.cut += hit_limit(model, tok, completion_ids, settings.max_new_tokens)
            else:
                ep.orch.user.reply = text
        for ep in active:
            step_tau2(ep, settings.max_steps, seqs.get(id(ep)))
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


def wm_state(domain, task, messages):
    """The world model's τ² state before an agent message: policy and tools, the user's basic information
    (`task`) and the conversation so far."""
    return (
        f"{tau2_domain(domain)[2]}\n\nUser information: {task or '(none)'}\n\n"
        f"The conversation so far:\n{conversation(messages)}"
    )


def tau2_triplet_records(rollout):
    """Agent message t gives <state: policy, tools, the user's basic information and the conversation so far,
    action: the message or tool call, next_state: the user's reply (kind "user") or the tool's answer masked
    to its schema (kind "tool"; an error stays as it is)>."""
    msgs, out = rollout["messages"], []
    domain = rollout["game"].split("/")[0]
    for i, m in enumerate(msgs):
        if "output" not in m:
            continue  # the Orchestrator's greeting is not the model's
        after = agent_view(msgs[i + 1 :])
        if m.get("tool_calls"):
            answers = [a for a in after[: len(m["tool_calls"])] if a["role"] == "tool"]
            kind, nxt = "tool", "\n".join(a["content"] if a["error"] else mask_json(a["content"]) for a in answers)
        else:
            replies = [a for a in after if a["role"] == "user"][:1]
            kind, nxt = "user", replies[0]["content"] if replies else ""
        if not nxt:
            continue  # the episode ended before an answer
        out.append(
            dict(
                id=f"{rollout['game']}#{rollout['episode']}#{len(out)}",
                env="tau2",
                game=rollout["game"],
                task=rollout["task"],
                history=[],
                state=wm_state(domain, rollout["task"], msgs[:i]),
                action=message_text(m),
                next_state=nxt,
                kind=kind,
                valid=m["valid"],
            )
        )
    return out


def tau2_rollout_record(ep, settings):
    """A finished τ² episode as a rollout line: the conversation, tau2's reward and its breakdown."""
    return dict(
        env="tau2",
        game=ep.game,
        split=ep.split,
        task_type=ep.game.split("/")[0],
        task=ep.task,
        episode=ep.index,
        won=ep.won,
        reward=ep.reward,
        steps=len(ep.turns),
        invalid=sum(not t["valid"] for t in ep.turns),
        cut_turns=ep.cut,
        termination=ep.termination,
        reward_info=ep.reward_info,
        turns=ep.turns,
        messages=ep.messages,
        policy="model",
        epsilon=0.0,
        model=settings.model,
        user_model=settings.user_model,
        seed=settings.seed,
    )
