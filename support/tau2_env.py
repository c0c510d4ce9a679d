"""τ²-bench through the package's own environments, agent prompt, user simulator, Orchestrator and evaluator: the
adapter that lets collect.py, train_policy.py and evaluate.py play its tasks (imported only for --env tau2).

The model is the customer-service agent and sees what tau2's `LLMAgent` sends a chat-completions server
(tau2/agent/llm_agent.py: its system prompt with <instructions> and <policy>, the conversation as chat messages,
the tools as `tools=`), rendered with the model's own chat template; its tool calls are read as the template
writes them (<tool_call>{"name", "arguments"}</tool_call>, Qwen's format) and answered as `tool` messages.
One fixed user plays the customer in every stage (`--user-model local:MODEL`: a frozen local model; or any
litellm id); tau2's Orchestrator runs the conversation against the real domain database with the limits of
`Orchestrator.run`, and tau2's evaluate_simulation scores it. A triplet's next state is the user's reply or the
tool's answer masked to its schema (`mask_json`).
"""

import json
import os
import random
import re
import types
from collections import namedtuple
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from itertools import count, zip_longest
from typing import Annotated, Any, Literal, Union, get_args, get_origin

os.environ.setdefault(
    "LITELLM_LOCAL_MODEL_COST_MAP", "True"
)  # before tau2, which imports litellm: no network for its cost map
from loguru import logger  # installed with tau2, which logs DEBUG lines from its first import on

logger.disable("tau2")
from pydantic import BaseModel
from tau2.agent.llm_agent import LLMAgent
from tau2.config import DEFAULT_LLM_TEMPERATURE_USER, DEFAULT_MAX_ERRORS, DEFAULT_MAX_RETRIES
from tau2.data_model.message import AssistantMessage, MultiToolMessage, ToolCall, UserMessage
from tau2.data_model.simulation import (
    AgentInfo,
    Info,
    Results,
    RewardInfo,
    SimulationRun,
    TerminationReason,
    UserInfo,
)
from tau2.environment.environment import EnvironmentInfo
from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation
from tau2.metrics.agent_metrics import compute_metrics
from tau2.orchestrator.orchestrator import Orchestrator, Role
from tau2.registry import registry
from tau2.user.base import UserState
from tau2.user.user_simulator import UserSimulator
from tau2.utils.llm_utils import to_litellm_messages

from support.checks import fail
from support.episode import Episode
from support.lm import chat_prompt, hit_limit, load_config, load_model, load_tokenizer, sample, strip_thinking

TAU2_DOMAINS = ("retail", "airline", "telecom", "mock")  # mock: tau2's small test domain, for CPU runs
TAU2_MAX_ERRORS = DEFAULT_MAX_ERRORS  # tau2's default: the episode ends after 10 tool errors
TAU2_RETRIES = DEFAULT_MAX_RETRIES  # tau2.run passes num_retries=3 to every LLM call (tau2.run.run_domain)
USER_TEMPERATURE = DEFAULT_LLM_TEMPERATURE_USER  # tau2's runs sample their user simulator at 0.0
PROMPT_GROWTH = 16384  # tokens a conversation may add to its opening prompt in the plan (see `prompt_budget`)
CALL_IDS = count()  # tool-call ids, unique in a process
Domain = namedtuple("Domain", "tasks splits system tools returns")


@lru_cache(maxsize=None)
def tau2_domain(domain):
    """A domain's tasks ({id: Task}), splits ({split: [ids]}, None for mock), the agent's system prompt (tau2's
    `LLMAgent.system_prompt`), its tools as JSON schemas, and every tool's return annotation (the user's too)."""
    if domain not in TAU2_DOMAINS:
        fail(f"unknown τ²-bench domain {domain!r} (choose from {', '.join(TAU2_DOMAINS)})")
    splits = registry.get_task_splits_loader(domain)
    env = registry.get_env_constructor(domain)()
    tools = env.get_tools() + (env.get_user_tools() if env.user_tools else [])
    return Domain(
        {t.id: t for t in registry.get_tasks_loader(domain)()},
        splits() if splits else None,
        LLMAgent(tools=env.get_tools(), domain_policy=env.get_policy()).system_prompt,
        [t.openai_schema for t in env.get_tools()],
        {t.name: t.returns.model_fields["returns"].annotation for t in tools},
    )


def list_tasks(domains, split, n=None, ids=None):
    """Task names "domain/id" of a split, taking the domains in turn, the first n; or the named `ids`
    ("domain/id", or an id of the first domain), each once, each in its own domain."""
    if ids:
        names = list(dict.fromkeys(i if "/" in i else f"{domains[0]}/{i}" for i in ids))
        for name in names:
            domain, _, tid = name.partition("/")
            if domain not in domains:
                fail(f"τ²-bench task {name!r} is not in --domain {' '.join(domains)}")
            if tid not in tau2_domain(domain).tasks:
                fail(f"unknown τ²-bench task {name!r}")
        return names[:n] if n else names
    per_domain = []
    for d in domains:
        tasks, splits = tau2_domain(d)[:2]
        if splits is not None and split not in splits:
            fail(f"τ²-bench domain {d} has no split {split!r} (choose from {', '.join(splits)})")
        per_domain.append([f"{d}/{i}" for i in (splits[split] if splits else tasks)])
    in_turn = [t for row in zip_longest(*per_domain) for t in row if t]
    return in_turn[:n] if n else in_turn


def user_info(task):
    """The user's basic information that the world model sees (paper C.1: "available to the user simulator", never
    the user's intent): τ²'s task data keeps it in user_scenario.instructions.known_info ("You are Yusuf Rossi in zip
    code 19122."), beside what the user does not know (unknown_info), why they call (reason_for_call) and what to do
    (task_instructions), which stay out; a task without known_info gives the user's persona, if any."""
    instructions = task.user_scenario.instructions
    return getattr(instructions, "known_info", None) or task.user_scenario.persona or ""


# ---------------------------------------------------------------------------------------------
# The agent's prompt and the reading of its reply (ALGO LOGIC: the policy's input and output format)
# ---------------------------------------------------------------------------------------------
def api_message(m):
    """A chat message as a chat template reads it: text content ("" beside tool calls) and tool calls whose
    arguments are the object (a server such as vLLM parses the API's JSON string before it applies the template)."""
    out = dict(role=m["role"], content=m.get("content") or "")
    if m.get("tool_calls"):
        out["tool_calls"] = [
            dict(type="function", function=dict(name=c["function"]["name"], arguments=c["function"]["arguments"]))
            for c in m["tool_calls"]
        ]
        for c in out["tool_calls"]:
            if isinstance(c["function"]["arguments"], str):  # tau2's to_litellm_messages writes json.dumps
                c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return out


def record_message(rec):
    """A conversation record (`message_record`) as the chat message tau2's to_litellm_messages makes of it."""
    calls = [dict(function=dict(name=c["name"], arguments=c["arguments"])) for c in rec.get("tool_calls") or []]
    return api_message(dict(role=rec["role"], content=rec["content"], tool_calls=calls))


def agent_view(messages):
    """The agent's side of a conversation: the user's tool calls and their results (telecom) are the user's."""
    return [
        m
        for m in messages
        if m.get("requestor", "assistant") == "assistant" and not (m["role"] == "user" and m.get("tool_calls"))
    ]


def agent_chat(domain, messages):
    """The messages tau2's LLMAgent sends (`system_messages + state.messages` through to_litellm_messages), from a
    conversation's records: what the agent's prompt renders and the world model's state writes out."""
    return [dict(role="system", content=tau2_domain(domain).system)] + [record_message(m) for m in agent_view(messages)]


# Qwen's tool block (tests/data/chat_templates/qwen3-8b...), for templates that have no tool format of their own
HERMES_TOOLS = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML \
tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def tool_call_text(call):
    return "<tool_call>\n" + json.dumps(dict(name=call["name"], arguments=call["arguments"])) + "\n</tool_call>"


def as_text(messages, tools):
    """Chat messages with their tools, tool calls and tool results written as text the way Qwen's template writes
    them (tools in the system message, <tool_call> in the assistant's turn, <tool_response> as a user turn)."""
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append(dict(role="user", content=f"<tool_response>\n{m['content']}\n</tool_response>"))
            continue
        calls = [tool_call_text(c["function"]) for c in m.get("tool_calls") or []]
        out.append(dict(role=m["role"], content="\n".join([m["content"]] * bool(m["content"]) + calls)))
    if tools:
        block = HERMES_TOOLS.format(tools="\n".join(json.dumps(t) for t in tools))
        out[0]["content"] = f"{out[0]['content']}\n\n{block}"
    return out


def render(tok, messages, tools, thinking=True):
    """Chat messages and tools rendered with the model's own chat template (`tools=`: Qwen's `# Tools` block); a
    template without a tool format (the tiny SmolLM2's) gets them as Qwen's text (`as_text`)."""
    if tools and "tools" not in (tok.chat_template or ""):
        messages, tools = as_text(messages, tools), None
    return chat_prompt(tok, messages, thinking=thinking, tools=tools)


def tau2_agent_prompt(tok, ep, thinking=True):
    """The agent's prompt at an episode's turn: tau2's LLMAgent messages and tools, in the model's chat template
    (`thinking=False`: the template's switch, --thinking off)."""
    domain = ep.game.split("/")[0]
    return render(tok, agent_chat(domain, ep.messages), tau2_domain(domain).tools, thinking)


def parse_reply(text, tool_names, requestor="assistant"):
    """A model's message -> (content, tool_calls, valid), read as a server's Hermes tool parser reads Qwen's
    format (vLLM's Hermes2ProToolParser.extract_tool_calls). Thinking is dropped (`strip_thinking`: a think block
    left open leaves no message). Each <tool_call>{"name": ..., "arguments": ...}</tool_call> whose JSON is an
    object with a string name is a tool call, sent to the environment whatever it names: an unknown tool or
    arguments that are no object get tau2's own error there (valid: false); every call of the reply is made, in
    order. The text before the first call is the message's content, kept beside its calls as τ² keeps it
    (tau2/utils/llm_utils.generate: AssistantMessage(content=..., tool_calls=...)), where τ²'s communicate check
    reads it; None when there is none. Text without such a call goes to the other side as a message (a <tool_call>
    block that is no such object: the whole text, valid: false). No text at all: (None, None, False), an empty
    reply, which the loop asks again for (`write`)."""

    text = strip_thinking(text or "").strip()
    blocks = re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, flags=re.S)
    if not blocks:
        return text or None, None, bool(text)
    calls, valid = [], True
    for block in blocks:
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return text, None, False
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
            return text, None, False
        args = call.get("arguments")
        valid &= call["name"] in tool_names and isinstance(args, dict)
        # model_construct: arguments that are no object reach the environment, as an API agent's would
        calls.append(
            ToolCall.model_construct(
                id=f"call_{next(CALL_IDS)}", name=call["name"], arguments=args, requestor=requestor
            )
        )
    return text[: text.find("<tool_call>")].strip() or None, calls, valid


class ModelAgent(LLMAgent):
    """The project's model as tau2's LLMAgent (its system prompt and state): the batched loop writes the model's
    text into `reply` before the Orchestrator asks for the next message, which `parse_reply` reads."""

    reply = ""

    def set_seed(self, seed):
        pass  # sampling is seeded by the loop

    def generate_next_message(self, message, state):
        state.messages.extend(message.tool_messages if isinstance(message, MultiToolMessage) else [message])
        content, calls, valid = parse_reply(self.reply, {t.name for t in self.tools})
        msg = AssistantMessage(
            role="assistant", content=content, tool_calls=calls, raw_data=dict(output=self.reply, valid=valid)
        )
        state.messages.append(msg)
        return msg, state


# ---------------------------------------------------------------------------------------------
# The user: tau2's user simulator, one fixed model in every stage
# ---------------------------------------------------------------------------------------------
class LocalUser(UserSimulator):
    """tau2's user simulator answered by a local model: tau2's own system prompt, flipped conversation and stop
    signals, its tools (telecom's phone) as `tools=` and their results as tool messages, thinking off; the
    batched loop writes the model's text into `reply`."""

    reply = ""

    def set_seed(self, seed):
        pass  # sampling is seeded by the loop

    def prompt(self, tok, message, state):
        """What UserSimulator._generate_next_message sends: system messages + the flipped conversation, tools."""
        incoming = message.tool_messages if isinstance(message, MultiToolMessage) else [message]
        flipped = UserState(system_messages=[], messages=state.messages + incoming).flip_roles()
        messages = [api_message(m) for m in to_litellm_messages(state.system_messages + flipped)]
        return render(tok, messages, [t.openai_schema for t in self.tools or []], thinking=False)

    def generate_next_message(self, message, state):
        state.messages.extend(message.tool_messages if isinstance(message, MultiToolMessage) else [message])
        content, calls, _ = parse_reply(self.reply, {t.name for t in self.tools or []}, requestor="user")
        msg = UserMessage(role="user", content=content, tool_calls=calls)
        state.messages.append(msg)
        return msg, state


def load_user(user_model, dtype="auto"):
    """(model, tokenizer) of a fixed local user `local:MODEL`, loaded once, frozen and never trained; None for a
    litellm id and for self-play ("self": the played model answers as its user)."""
    if not user_model.startswith("local:"):
        return None
    model, tok = load_model(user_model.removeprefix("local:"), dtype=dtype)
    return model.eval().requires_grad_(False), tok


def tau2_user(env, task, user_model):
    """tau2's user simulator with the task's scenario: `user_model` is a litellm model id (e.g. gpt-4.1, or
    openai/<name> with OPENAI_API_BASE pointing at an OpenAI-compatible server), called at τ²'s user temperature
    with τ²'s retries; "local:MODEL" or "self" is the same prompt and stop signals answered by a local model."""
    tools = env.get_user_tools() if env.user_tools else None  # telecom: the user acts on their phone
    if user_model == "self" or user_model.startswith("local"):
        return LocalUser(tools=tools, instructions=str(task.user_scenario))
    return UserSimulator(
        tools=tools,
        instructions=str(task.user_scenario),
        llm=user_model,
        llm_args=dict(temperature=USER_TEMPERATURE, num_retries=TAU2_RETRIES),
    )


# ---------------------------------------------------------------------------------------------
# Episodes: tau2's Orchestrator stepped by the batched loop, with the limits of Orchestrator.run
# ---------------------------------------------------------------------------------------------
@dataclass
class Tau2Episode(Episode):
    orch: object = None  # tau2's Orchestrator, stepped by play_tau2
    messages: list = field(default_factory=list)  # the conversation as plain dicts (see message_record)
    reward: float = 0.0
    reward_info: dict = field(default_factory=dict)
    termination: str = ""
    seq: tuple = None  # the agent's (prompt_ids, completion_ids) of the step about to be taken


def start_tau2(name, split, index, seed, user_model):
    domain, _, tid = name.partition("/")
    task = tau2_domain(domain).tasks[tid]
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


def message_text(m):
    """An agent's or user's message as the action a triplet records: its text, then its tool calls, as Qwen's
    template writes them."""
    calls = [tool_call_text(c) for c in m.get("tool_calls") or []]
    return "\n".join([m["content"]] * bool(m["content"]) + calls)


def step_tau2(ep, max_steps):
    """One Orchestrator step (agent, user or environment), then the limits as `Orchestrator.run` checks them:
    only when no tool is to answer, max_steps orchestrator steps (every message; τ²'s runs: 200) end the episode
    as MAX_STEPS, even where that step's message was a stop, and TAU2_MAX_ERRORS tool errors as TOO_MANY_ERRORS."""
    o = ep.orch
    agent_turn = o.to_role == Role.AGENT
    seen = len(o.trajectory)
    o.step()
    names = {c.id: c.name for c in getattr(o.trajectory[seen - 1], "tool_calls", None) or []}  # what answers answer
    ep.messages += [message_record(m, names) for m in o.trajectory[seen:]]
    if agent_turn:
        m = ep.messages[-1]
        ep.turns.append(dict(output=m["output"], action=message_text(m), valid=m["valid"]))
        ep.seqs.append(ep.seq)
    if o.to_role != Role.ENV:
        if o.step_count >= max_steps:
            o.done, o.termination_reason = True, TerminationReason.MAX_STEPS
        if o.num_errors >= TAU2_MAX_ERRORS:
            o.done, o.termination_reason = True, TerminationReason.TOO_MANY_ERRORS
    if o.done:
        finish(ep)


def finish(ep, termination=None):
    """Score a finished episode with tau2's evaluate_simulation; `termination` names an end τ² has no reason for
    (scored as its o.termination_reason)."""
    o = ep.orch
    o.done = True
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
        simulation=sim,
        task=o.task,
        evaluation_type=EvaluationType.ALL,
        solo_mode=False,
        domain=ep.game.split("/")[0],
    )
    ep.reward, ep.won, ep.done = info.reward, info.reward >= 1 - 1e-6, True
    ep.termination = termination or o.termination_reason.value
    ep.reward_info = dict(
        reward=info.reward,
        reward_breakdown={k.value: v for k, v in (info.reward_breakdown or {}).items()},
        note=info.info.get("note") if info.info else None,
    )


def prompt_limit(model, new_tokens, planned=0):
    """The longest prompt a model may be sent: its context less the reply, and at most `planned` (the plan's)."""
    context = getattr(model.config, "max_position_embeddings", None) or float("inf")
    return min(context - new_tokens, planned or float("inf"))


def prompt_budget(model, domains, new_tokens):
    """The prompt length a τ² turn is planned for (the memory plan's prompt_len): the longest opening prompt of
    the domains (tau2's system prompt, the tools, the greeting, in the model's chat template) + PROMPT_GROWTH
    tokens of conversation (each tool answer is sent again every turn: a retail product up to ~1.5k tokens), at
    most the model's context less the reply. An episode whose next prompt is longer ends as prompt_too_long."""
    tok, config = load_tokenizer(model), load_config(model)
    greeting = [dict(role="assistant", content="Hi! How can I help you today?")]
    opening = max(
        len(tok(render(tok, agent_chat(d, greeting), tau2_domain(d).tools), add_special_tokens=False)["input_ids"])
        for d in domains
    )
    context = getattr(config, "max_position_embeddings", None) or float("inf")
    return int(min(opening + PROMPT_GROWTH, context - new_tokens))


def empty(text):
    """Whether a reply holds neither text nor a tool call."""
    return parse_reply(text, ())[:2] == (None, None)


def write(eps, role, model, tok, temperature, new_tokens, limit, thinking=True):
    """Sample the next message of every episode in `eps` whose `role` (AGENT or USER) speaks, in one batch. A
    prompt over `limit` ends its episode (prompt_too_long; scored as τ²'s AGENT_ERROR / USER_ERROR, as a server's
    context-length error ends a τ² run); an empty reply is asked again TAU2_RETRIES times, as tau2's `generate`
    asks again (a greedy role at temperature 1: asked again greedily, it would write the same nothing), and is
    then τ²'s AGENT_ERROR / USER_ERROR, the error of an empty message (Orchestrator.check_communication_error)."""
    agent = role == Role.AGENT
    speaker = (lambda ep: ep.orch.agent) if agent else (lambda ep: ep.orch.user)
    error = TerminationReason.AGENT_ERROR if agent else TerminationReason.USER_ERROR
    prompts = {}
    for ep in eps:
        p = (
            tau2_agent_prompt(tok, ep, thinking)
            if agent
            else ep.orch.user.prompt(tok, ep.orch.message, ep.orch.user_state)
        )
        if len(tok(p, add_special_tokens=False)["input_ids"]) > limit:
            ep.orch.termination_reason = error
            finish(ep, "prompt_too_long")
        else:
            prompts[id(ep)] = p
    sampled = todo = [ep for ep in eps if id(ep) in prompts]
    for attempt in range(TAU2_RETRIES + 1 if todo else 0):
        heat = temperature if attempt == 0 or temperature > 0 else 1.0
        # no stop string: a turn ends at the model's end of turn, after as many tool calls as it makes
        outputs = sample(model, tok, [prompts[id(ep)] for ep in todo], new_tokens, heat)
        for ep, (prompt_ids, completion_ids, text) in zip(todo, outputs):
            speaker(ep).reply = text
            if agent:
                ep.seq = (prompt_ids, completion_ids)
        todo = [ep for ep in todo if empty(speaker(ep).reply)]
        if not todo:
            break
    for ep in sampled if agent else []:
        ep.cut += hit_limit(model, tok, ep.seq[1], new_tokens)
    for ep in todo:  # still nothing to send
        if agent:
            ep.turns.append(dict(output=ep.orch.agent.reply, action="", valid=False))
            ep.seqs.append(ep.seq)
        ep.orch.termination_reason = error
        finish(ep)


def play_tau2(jobs, model, tok, settings, user=None):
    """Play ("domain/id", split, episode index) jobs, B at a time: every Orchestrator is stepped in lockstep; the
    agent messages of a step come from one batched `sample` of the model, the user messages from one of the fixed
    user (`user`: (model, tokenizer) of settings.user_model "local:MODEL", loaded here when not given; "self":
    the played model; a litellm id: tau2's UserSimulator, called by the Orchestrator). Yields each finished
    Episode."""
    if not jobs:
        return
    if settings.user_model == "self":
        user = (model, tok)
    elif settings.user_model.startswith("local:") and user is None:
        user = load_user(settings.user_model)
    agent_limit = prompt_limit(model, settings.max_new_tokens, settings.max_prompt_tokens)
    user_limit = user and prompt_limit(user[0], settings.user_max_new_tokens)

    pending, active = list(enumerate(jobs)), []
    while pending or active:
        while pending and len(active) < settings.batch_games:
            k, job = pending.pop(0)
            active.append(start_tau2(*job, settings.seed, settings.user_model))
            active[-1].job = k
        agents = [ep for ep in active if ep.orch.to_role == Role.AGENT]
        thinking = settings.thinking == "on"
        write(agents, Role.AGENT, model, tok, settings.temperature, settings.max_new_tokens, agent_limit, thinking)
        if user:
            users = [ep for ep in active if ep.orch.to_role == Role.USER]
            write(users, Role.USER, *user, USER_TEMPERATURE, settings.user_max_new_tokens, user_limit)
        for ep in active:
            if not ep.done:
                step_tau2(ep, settings.max_steps)
        for ep in [ep for ep in active if ep.done]:
            active.remove(ep)
            yield ep


# ---------------------------------------------------------------------------------------------
# Records: a conversation becomes a rollout line and one triplet per agent message
# ---------------------------------------------------------------------------------------------
def members(kind):
    """The types an annotation allows (Annotated, Optional and Union unwrapped)."""
    if get_origin(kind) is Annotated:
        return members(get_args(kind)[0])
    if get_origin(kind) in (Union, types.UnionType):
        return [m for a in get_args(kind) for m in members(a)]
    return [kind]


def closed(kind):
    """Whether a dict's key type is a closed set that the data model names (Literal, Enum: airline's cabins)."""
    return get_origin(kind) is Literal or (isinstance(kind, type) and issubclass(kind, Enum))


JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}


def one_of(schemas):
    """One schema for several values: their distinct schemas, once each (`anyOf` where they differ)."""
    distinct = list({json.dumps(x): x for x in schemas}.values())
    return distinct[0] if len(distinct) == 1 else dict(anyOf=distinct)


def openapi_schema(value, kind):
    """The OpenAPI schema of `value` (paper C.1: a tool answer's values masked by its schema), `kind` being its
    annotation in tau2's data models. A field of a data model, a key of a closed set (Literal / Enum: airline's
    cabins) or of an untyped record (`Dict[str, Any]`, `Any`: telecom's tools write their own fixed keys) is a
    property; any other key is data (a `Dict[str, ...]` of payment-method or variant ids, dates, option names; the
    product names of a tool typed as returning text), and its map is `additionalProperties`. A list's and a data
    map's entries give one `items` / `additionalProperties` schema (their number is data too), a tuple one per
    position (`prefixItems`); a value is its type: string, integer, number, boolean, null."""
    kinds = members(kind)
    if isinstance(value, dict):
        models = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]
        fields = {n: f.annotation for k in models for n, f in k.model_fields.items()}
        maps = [get_args(k) for k in kinds if get_origin(k) is dict and get_args(k)]
        key, item = maps[0] if maps else (None, Any)
        if models:  # a data model: its fields are properties
            props = {k: openapi_schema(v, fields[k]) for k, v in value.items() if k in fields}
            extra = [openapi_schema(v, Any) for k, v in value.items() if k not in fields]
        elif closed(key) or (maps and item is Any) or kind is Any:  # a map whose keys are schema
            props, extra = {k: openapi_schema(v, item) for k, v in value.items()}, []
        else:  # a map whose keys are data
            props, extra = {}, [openapi_schema(v, item) for v in value.values()]
        out = dict(type="object", properties=props) if props else dict(type="object")
        return dict(out, additionalProperties=one_of(extra)) if extra else out
    if isinstance(value, list):
        args = next((get_args(k) for k in kinds if get_origin(k) in (list, tuple) and get_args(k)), (Any,))
        if any(get_origin(k) is tuple for k in kinds) and args[-1] is not Ellipsis:  # tuple[A, B]: every position
            return dict(type="array", prefixItems=[openapi_schema(v, a) for v, a in zip(value, args)])
        return dict(type="array", **(dict(items=one_of([openapi_schema(v, args[0]) for v in value])) if value else {}))
    return dict(type=JSON_TYPES.get(type(value), "string"))


def mask_json(text, domain=None, tool=None):
    """A tool's answer as the world model predicts it (paper C.1, Table A6): JSON becomes its OpenAPI schema
    (`openapi_schema`, read against the tool's return annotation in `domain`), written as JSON; a short status
    message that is no JSON ("Transfer successful") stays as it is."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text
    return json.dumps(openapi_schema(value, tau2_domain(domain).returns.get(tool, Any) if domain else Any))


def wm_state(domain, task, messages):
    """The world model's τ² state before an agent message (paper Table A6): the agent's own messages (`agent_chat`:
    tau2's system prompt, then the conversation) and tools, written as text the way Qwen's template writes them
    (`as_text`), with the user's basic information (`user_info`) between the system prompt and the history."""
    system, *chat = as_text(agent_chat(domain, messages), tau2_domain(domain).tools)
    conversation = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in chat) or "(none)"
    return (
        f"{system['content']}\n\n# User Information\nThe following information about the user is available:\n"
        f"{task or '(none)'}\n\n# History\n{conversation}"
    )


def tau2_triplet_records(rollout):
    """Agent message t gives <state: the agent's messages so far and the user's basic information (`wm_state`),
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
            kind = "tool"
            nxt = "\n".join(a["content"] if a["error"] else mask_json(a["content"], domain, a["name"]) for a in answers)
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
        # the agent's replies with tool calls; of them, those with text beside their calls and those with several
        # calls (τ² keeps both)
        call_turns=sum(bool(m.get("tool_calls")) for m in ep.messages if "output" in m),
        calls_with_text=sum(bool(m.get("tool_calls")) and bool(m["content"]) for m in ep.messages if "output" in m),
        multi_call_turns=sum(len(m.get("tool_calls") or []) > 1 for m in ep.messages if "output" in m),
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


# ---------------------------------------------------------------------------------------------
# τ²'s metrics: average reward and pass^k (tau2/metrics/agent_metrics.py: compute_metrics)
# ---------------------------------------------------------------------------------------------
def tau2_metrics(domain, runs, model="", user_model="", max_steps=0):
    """tau2's `compute_metrics` of one domain's episodes: `runs` holds one list of rollout records per run (run r is
    trial r of every task). Returns {"avg_reward", "pass^k" for k = 1..runs}: pass^k is, per task, the chance that
    k trials drawn from its runs all succeed (reward 1), averaged over tasks."""
    sims = [
        SimulationRun(
            id=f"{r['game']}#{trial}",
            task_id=r["game"].split("/", 1)[1],
            start_time="",
            end_time="",
            duration=0.0,
            termination_reason=TerminationReason._value2member_map_.get(
                r["termination"], TerminationReason.AGENT_ERROR
            ),
            reward_info=RewardInfo(reward=r["reward"]),
            agent_cost=0.0,
            messages=[],
            trial=trial,
        )
        for trial, rollouts in enumerate(runs)
        for r in rollouts
    ]
    tasks = tau2_domain(domain).tasks
    info = Info(
        git_commit="",
        num_trials=len(runs),
        max_steps=max_steps,
        max_errors=TAU2_MAX_ERRORS,
        user_info=UserInfo(implementation="user_simulator", llm=user_model),
        agent_info=AgentInfo(implementation="llm_agent", llm=model),
        environment_info=EnvironmentInfo(domain_name=domain, policy=""),
    )
    results = Results(info=info, tasks=[tasks[t] for t in dict.fromkeys(s.task_id for s in sims)], simulations=sims)
    metrics = compute_metrics(results)
    return {"avg_reward": float(metrics.avg_reward)} | {f"pass^{k}": float(v) for k, v in metrics.pass_hat_ks.items()}
