"""τ²-bench through the project's adapter: real tau2 domains, agent prompt, Orchestrator and evaluator, offline."""

import copy
import json
import re
import subprocess

import pytest

from collect import collect, parse_args, rollout_record, triplet_records
from conftest import ROOT
from support import report
from support.episode import summary
from support.tau2_env import (
    LocalUser,
    ModelAgent,
    agent_chat,
    api_message,
    list_tasks,
    mask_json,
    parse_reply,
    start_tau2,
    step_tau2,
    tau2_agent_prompt,
    tau2_metrics,
    tool_call_text,
)

TEMPLATES = ROOT / "tests" / "data" / "chat_templates"


@pytest.fixture(scope="module")
def qwen3(tiny):
    """The tiny tokenizer with Qwen3's real chat template (as tests/test_chat_templates.py loads it)."""
    tok = copy.deepcopy(tiny[1])
    tok.chat_template = json.loads((TEMPLATES / "qwen3-8b.tokenizer_config.json").read_text())["chat_template"]
    return tok


def gold_script(orch, drop_last_write=False):
    """(agent replies, user replies) that replay a task's gold actions, written as Qwen3 writes them (a think
    block, then <tool_call>): the user makes the task's own gold tool calls (telecom: on their phone) and asks,
    the agent makes the task's gold tool calls and tells the user what the task says it must; then the user
    stops. `drop_last_write` leaves out the agent's last call that changes the database."""
    from tau2.environment.toolkit import ToolType

    task, tools = orch.task, orch.environment.tools
    gold = task.evaluation_criteria.actions
    actions = [a for a in gold if a.requestor == "assistant"]
    if drop_last_write:
        del actions[[i for i, a in enumerate(actions) if tools.tool_type(a.name) == ToolType.WRITE][-1]]
    call = lambda a: tool_call_text(dict(name=a.name, arguments=a.arguments))
    agent = [f"<think>\nThe policy says: {a.name}.\n</think>\n\n{call(a)}" for a in actions]
    agent.append(" ".join(task.evaluation_criteria.communicate_info or []) or "Your request is done.")
    user = [call(a) for a in gold if a.requestor == "user"] + ["I need help, please."]
    return agent, user


STOP = "Thanks, that's all. ###STOP###"


def replay(name, drop_last_write=False, tok=None, max_steps=200, edit=None):
    """Drive the adapter (the model's agent and local user classes, step_tau2) with `gold_script`'s replies instead
    of sampled ones (`edit`: a function that rewrites the agent's). With `tok`, the local user's chat prompt at each
    of its turns is kept in `ep.user_prompts`."""
    from tau2.orchestrator.orchestrator import Role

    ep = start_tau2(name, "test", 0, seed=0, user_model="local:smollm2-135m")
    agent, user = gold_script(ep.orch, drop_last_write)
    agent = edit(agent) if edit else agent
    ep.user_prompts = []
    while not ep.done:
        if ep.orch.to_role == Role.AGENT:
            ep.orch.agent.reply = agent.pop(0)
        elif ep.orch.to_role == Role.USER:
            if tok:
                ep.user_prompts.append(ep.orch.user.prompt(tok, ep.orch.message, ep.orch.user_state))
            ep.orch.user.reply = user.pop(0) if user else STOP
        step_tau2(ep, max_steps)
    return ep


TELECOM = (
    "telecom/[mms_issue]airplane_mode_on|bad_network_preference|break_app_both_permissions|data_usage_exceeded|"
    "unseat_sim_card|user_abroad_roaming_disabled_on[PERSONA:Hard]"
)  # the user acts on the phone too


@pytest.mark.parametrize("name", ["retail/5", "airline/8", TELECOM])
def test_gold_replay_scores_one_and_a_replay_without_its_last_write_zero(name):
    gold = replay(name)
    assert gold.termination == "user_stop" and gold.reward == 1.0 and gold.won
    assert all(t["valid"] for t in gold.turns) and gold.turns[0]["action"].startswith("<tool_call>")
    broken = replay(name, drop_last_write=True)
    assert broken.termination == "user_stop" and broken.reward == 0.0 and not broken.won


def test_the_agent_sees_tau2s_llm_agent_messages_in_qwen3s_own_template_with_its_tools(qwen3):
    from tau2.utils.llm_utils import to_litellm_messages

    ep = replay("retail/5")
    o = ep.orch  # what tau2's LLMAgent would send: its system messages and state, as a chat-completions API gets them
    sent = [api_message(m) for m in to_litellm_messages(o.agent_state.system_messages + o.agent_state.messages)]
    assert agent_chat("retail", ep.messages[:-1]) == sent  # (the user's last message, its stop, reached no agent)
    prompt = tau2_agent_prompt(qwen3, ep)
    assert prompt.startswith("<|im_start|>system\n<instructions>\nYou are a customer service agent that helps")
    assert "</instructions>\n<policy>\n# Retail agent policy" in prompt and prompt.count("<|im_start|>system") == 1
    tools = prompt[prompt.index("# Tools") : prompt.index("\n</tools>")]  # the template's own tool block
    assert tools.count('{"type": "function", "function": {"name": ') == 15 and '"name": "get_order_details"' in tools
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "find_user_id_by_name_zip", "arguments": {' in prompt
    assert prompt.count("<|im_start|>user\n<tool_response>\n") == 5 and "<think>" not in prompt  # tool results
    assert prompt.endswith(f"<|im_start|>user\n{STOP}<|im_end|>\n<|im_start|>assistant\n")
    # the Qwen3-format replies (think block, then the call) ran their tools: each call has its answer
    answers = [m for m in ep.messages if m["role"] == "tool"]
    assert [m["name"] for m in answers] == [c["name"] for m in ep.messages for c in m.get("tool_calls", [])]
    assert not any(m["error"] for m in answers) and ep.turns[0]["output"].startswith("<think>")


def test_the_fixed_user_sees_tau2s_prompt_with_its_phone_tools_and_their_results_thinking_off(qwen3):
    ep = replay(TELECOM, tok=qwen3)
    first, second, last = ep.user_prompts[0], ep.user_prompts[1], ep.user_prompts[-1]
    assert first.startswith("<|im_start|>system\n") and "<scenario>" in first  # tau2's user prompt
    assert "# Tools" in first and '"name": "toggle_airplane_mode"' in first  # the phone's tools, as tools=
    assert first.endswith(  # the agent's greeting as "user", and Qwen3's own switch: thinking off
        "<|im_start|>user\nHi! How can I help you today?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "toggle_airplane_mode"' in second  # its own call
    assert "<|im_start|>user\n<tool_response>\n" in second  # the phone's answer, as a tool message
    assert '"refuel_data"' not in last and ep.turns[0]["action"].startswith('<tool_call>\n{"name": "refuel_data"')


def test_the_step_limit_ends_as_orchestrator_run_ends_it():
    """retail/5's gold replay takes 13 steps, the last the user's ###STOP###: at --max-steps 13 tau2's own
    Orchestrator.run ends it as MAX_STEPS (reward 0), and so does step_tau2; at 14 both end by the user's stop."""
    from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation
    from tau2.orchestrator.orchestrator import Orchestrator
    from tau2.registry import registry

    class ScriptedAgent(ModelAgent):
        def generate_next_message(self, message, state):
            self.reply = self.script.pop(0)
            return super().generate_next_message(message, state)

    class ScriptedUser(LocalUser):
        def generate_next_message(self, message, state):
            self.reply = self.script.pop(0) if self.script else STOP
            return super().generate_next_message(message, state)

    for max_steps, end in [(13, "max_steps"), (14, "user_stop")]:
        ours = replay("retail/5", max_steps=max_steps)
        task = ours.orch.task
        env = registry.get_env_constructor("retail")()
        agent = ScriptedAgent(tools=env.get_tools(), domain_policy=env.get_policy())
        user = ScriptedUser(tools=None, instructions=str(task.user_scenario))
        agent.script, user.script = gold_script(ours.orch)
        sim = Orchestrator("retail", agent, user, env, task, max_steps=max_steps, max_errors=10, seed=0).run()
        info = evaluate_simulation(sim, task, EvaluationType.ALL, solo_mode=False, domain="retail")
        assert ours.termination == sim.termination_reason.value == end and ours.orch.step_count == 13
        assert ours.reward == info.reward == (end == "user_stop")


def test_an_unknown_tool_or_arguments_that_are_no_object_get_tau2s_error_and_count_towards_its_limit():
    from tau2.orchestrator.orchestrator import Role

    ep = start_tau2("retail/5", "test", 0, seed=0, user_model="local:smollm2-135m")
    ep.orch.user.reply = "I want to return a water bottle."
    step_tau2(ep, 200)
    ep.orch.agent.reply = '<tool_call>\n{"name": "get_order_details", "arguments": ["#W1"]}\n</tool_call>'
    step_tau2(ep, 200)
    step_tau2(ep, 200)  # the environment answers the call
    assert ep.messages[-1]["error"] and "must be a mapping, not list" in ep.messages[-1]["content"]
    ep.orch.agent.reply = "Could you give me your email address?"  # no tool call: a message to the user
    step_tau2(ep, 200)
    assert ep.orch.to_role == Role.USER and ep.turns[-1]["valid"] and ep.messages[-1]["role"] == "assistant"
    ep.orch.user.reply = "It is mei@example.com."
    step_tau2(ep, 200)
    while not ep.done:  # an API agent that calls a tool the domain does not have
        ep.orch.agent.reply = '<tool_call>\n{"name": "drop_database", "arguments": {}}\n</tool_call>'
        step_tau2(ep, 200)
        step_tau2(ep, 200)
        assert ep.messages[-1] == dict(
            role="tool",
            content="Error: Tool 'drop_database' not found.",
            name="drop_database",
            requestor="assistant",
            error=True,
        )
    assert ep.orch.num_errors == 10 and ep.termination == "too_many_errors" and ep.reward == 0.0
    assert [t["valid"] for t in ep.turns] == [False, True] + [False] * 9


def test_gold_replay_triplets_state_what_the_agent_sees_and_mask_tool_answers_to_their_schema():
    ep = replay("retail/5")
    rollout = rollout_record(ep, parse_args(["--env", "tau2"]))
    triplets = triplet_records(rollout, 2)
    tools = [t for t in triplets if t["kind"] == "tool"]
    assert len(tools) == len(ep.turns) - 1 == 5  # five gold tool calls, then the message to the user
    assert [t["kind"] for t in triplets][-1] == "user" and triplets[-1]["next_state"].endswith("###STOP###")
    first, last = triplets[0]["state"], triplets[-1]["state"]
    assert first.startswith("<instructions>\nYou are a customer service agent") and "\n# Tools\n" in first
    assert first.endswith("[assistant]\nHi! How can I help you today?\n\n[user]\nI need help, please.")
    assert "[user]\n<tool_response>\n" in last and "\n\n# User Information\nThe following information about" in last
    assert "\n\n# History\n[assistant]\nHi! How can I help you today?" in first  # Table A6's order
    for t in tools:
        assert t["action"].startswith("<tool_call>\n{") and t["action"].endswith("}\n</tool_call>")
    masked = {t["action"].split('"')[3]: t["next_state"] for t in tools}
    variants = json.loads(masked["get_product_details"])["properties"]["variants"]  # keyed by variant ids: data
    assert set(variants) == {"type", "additionalProperties"} and set(
        variants["additionalProperties"]["properties"]
    ) == {"item_id", "options", "available", "price"}


def openapi_problems(schema, path="$"):
    """What makes `schema` no OpenAPI schema of the kinds mask_json writes (empty: none): every node a type of
    object / array / string / integer / number / boolean / null, or anyOf; only the keys its type allows."""
    if not isinstance(schema, dict):
        return [f"{path}: {schema!r} is no schema"]
    if "anyOf" in schema:
        if set(schema) != {"anyOf"} or len(schema["anyOf"]) < 2:
            return [f"{path}: anyOf of {len(schema['anyOf'])}, or beside {sorted(schema)}"]
        return [p for i, x in enumerate(schema["anyOf"]) for p in openapi_problems(x, f"{path}.anyOf[{i}]")]
    kind = schema.get("type")
    allowed = dict(object={"properties", "additionalProperties"}, array={"items", "prefixItems"})
    if kind not in ("object", "array", "string", "integer", "number", "boolean", "null"):
        return [f"{path}: type {kind!r}"]
    if set(schema) - {"type"} - allowed.get(kind, set()):
        return [f"{path}: keys {sorted(schema)} for a {kind}"]
    children = [(f"{path}.{k}", v) for k, v in schema.get("properties", {}).items()]
    children += [(f"{path}.*", schema[k]) for k in ("additionalProperties", "items") if k in schema]
    children += [(f"{path}[{i}]", v) for i, v in enumerate(schema.get("prefixItems", []))]
    return [p for where, child in children for p in openapi_problems(child, where)]


def property_names(schema):
    if not isinstance(schema, dict):
        return []
    own = list(schema.get("properties", {}))
    nested = [*schema.get("properties", {}).values(), *schema.get("anyOf", []), *schema.get("prefixItems", [])]
    nested += [schema[k] for k in ("additionalProperties", "items") if k in schema]
    return own + [n for child in nested for n in property_names(child)]


@pytest.mark.parametrize("name", ["retail/5", "airline/8", TELECOM])
def test_every_tool_answer_of_a_domain_is_written_as_a_valid_openapi_schema_without_its_data(name):
    ep = replay(name)
    domain = name.split("/")[0]
    answers = [m for m in ep.messages if m["role"] == "tool" and not m["error"]]
    assert answers
    for m in answers:
        out = mask_json(m["content"], domain, m["name"])
        try:
            json.loads(m["content"])
        except json.JSONDecodeError:  # a status message ("Transfer successful") is predicted as it is (C.1)
            assert out == m["content"]
            continue
        schema = json.loads(out)
        assert openapi_problems(schema) == [], (m["name"], out)
        # no value of the answer is left, and no key that is data (ids, dates: a run of digits) names a property
        assert all(not re.search(r"\d{4}", k) for k in property_names(schema)), (m["name"], out)
        values = re.findall(r'(?<=: )"([^"]{3,})"', m["content"])
        assert not [v for v in values if f'"{v}"' in out and v not in property_names(schema)], (m["name"], out)


def answer(domain, tool, **arguments):
    """A real answer of a domain's tool, from tau2's environment."""
    from tau2.data_model.message import ToolCall
    from tau2.registry import registry

    return registry.get_env_constructor(domain)().get_response(ToolCall(name=tool, arguments=arguments)).content


def test_the_schema_mask_makes_maps_with_data_keys_additional_properties():
    real = answer("retail", "get_user_details", user_id="noah_brown_6181")
    assert '"paypal_5727330": {' in real and '"credit_card_7815826": {' in real
    schema = json.loads(mask_json(real, "retail", "get_user_details"))
    payments = schema["properties"]["payment_methods"]  # keyed by the methods' ids: data, each kind of entry once
    assert set(payments) == {"type", "additionalProperties"} and len(payments["additionalProperties"]["anyOf"]) == 2
    assert schema["properties"]["orders"] == dict(type="array", items=dict(type="string"))  # their number is data too
    assert schema["properties"]["name"] == dict(
        type="object", properties=dict(first_name=dict(type="string"), last_name=dict(type="string"))
    )
    out = mask_json(answer("airline", "get_user_details", user_id="mia_li_3668"), "airline", "get_user_details")
    assert "certificate" not in out and "4856383" not in out
    flights = json.loads(
        mask_json(
            answer("airline", "search_direct_flight", origin="JFK", destination="SEA", date="2024-05-20"),
            "airline",
            "search_direct_flight",
        )
    )
    assert flights["type"] == "array" and flights["items"]["properties"]["prices"]["properties"] == {
        cabin: dict(type="integer") for cabin in ("basic_economy", "economy", "business")
    }  # Literal keys are schema: properties
    assert flights["items"]["properties"]["date"] == dict(type="null")
    products = answer("retail", "list_all_product_types")  # typed as text: its keys (product names) are data
    assert '"T-Shirt": "9523456873"' in products and json.loads(
        mask_json(products, "retail", "list_all_product_types")
    ) == dict(type="object", additionalProperties=dict(type="string"))
    assert mask_json(answer("retail", "calculate", expression="2 * 3.5"), "retail", "calculate") == '{"type": "number"}'
    assert mask_json("Transfer successful") == "Transfer successful"  # a status message: as it is


def test_parse_reply_reads_qwens_tool_calls_and_sends_every_named_call_to_the_environment():
    names = {"get_order_details"}
    content, calls, valid = parse_reply(
        '<think>look it up</think>\n\n<tool_call>\n{"name": "get_order_details", '
        '"arguments": {"order_id": "#W1"}}\n</tool_call>',
        names,
    )
    assert (
        content is None and valid and (calls[0].name, calls[0].arguments) == ("get_order_details", {"order_id": "#W1"})
    )
    assert parse_reply("Sure, what is your zip code?", names) == ("Sure, what is your zip code?", None, True)
    for call in [
        '<tool_call>{"name": "drop_database", "arguments": {}}</tool_call>',  # unknown tool
        '<tool_call>{"name": "get_order_details"}</tool_call>',  # no arguments
        '<tool_call>{"name": "get_order_details", "arguments": ["#W1"]}</tool_call>',  # arguments no object
    ]:  # a call all the same: the environment answers with tau2's error
        content, calls, valid = parse_reply(call, names)
        assert content is None and len(calls) == 1 and not valid
    for bad in [
        '<tool_call>{"name": "get_order_details", "arguments": {"order_id": </tool_call>',  # not JSON
        '<tool_call>{"name": ["get_order_details"], "arguments": {}}</tool_call>',  # a name that is not a string
        '<tool_call>["get_order_details", {}]</tool_call>',  # not an object
        '<tool_call>{"name": "get_order_details", "arguments": {"order_id": "#W1"}',  # cut off
    ]:  # no tool call: the text goes to the user
        content, calls, valid = parse_reply(bad, names)
        assert calls is None and not valid and content == bad
    assert parse_reply("<think>never closed", names) == (None, None, False)  # empty: asked again (`write`)
    # text beside calls is the message's content, as vLLM's Hermes parser and τ² keep it; every call is made
    content, calls, valid = parse_reply(
        'I will look up both orders.\n<tool_call>\n{"name": "get_order_details", "arguments": {"order_id": "#W1"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_order_details", "arguments": {"order_id": "#W2"}}\n</tool_call>',
        names,
    )
    assert content == "I will look up both orders." and valid
    assert [c.arguments["order_id"] for c in calls] == ["#W1", "#W2"]


def test_text_beside_a_tool_call_is_kept_and_scored_as_tau2_scores_it():
    """retail/32 checks that the agent tells the user 746342064230: told beside the last gold call, it is the
    message's content, which τ²'s communicate check reads (reward 1); the same reply without it scores 0."""

    def beside(info):
        def edit(agent):
            last = agent[-2].replace("</think>\n\n", f"</think>\n\n{info}\n")
            return [*agent[:-2], last, "Your request is done."]

        return edit

    told, untold = (
        replay("retail/32", edit=beside("Your refund code is 746342064230.")),
        replay("retail/32", edit=beside("")),
    )
    assert told.messages[-4]["content"] == "Your refund code is 746342064230." and told.messages[-4]["tool_calls"]
    assert told.reward == 1.0 and told.reward_info["reward_breakdown"]["COMMUNICATE"] == 1.0
    assert untold.reward == 0.0 and untold.reward_info["reward_breakdown"]["COMMUNICATE"] == 0.0
    stats = summary([record(told), record(untold)])  # what collect prints: of the replies with calls, 1 with text
    calls = [m for ep in (told, untold) for m in ep.messages if m.get("tool_calls")]
    assert stats["call_turns"] == len(calls) > 2 and stats["calls_with_text"] == 1 and stats["multi_call_turns"] == 0


def test_every_tool_call_of_a_reply_runs_in_order():
    def merge(agent):  # the two first gold calls in one reply
        return [agent[0] + "\n" + agent[1].split("\n\n", 1)[1], *agent[2:]]

    ep = replay("retail/32", edit=merge)
    first = next(i for i, m in enumerate(ep.messages) if m.get("tool_calls"))
    assert [c["name"] for c in ep.messages[first]["tool_calls"]] == ["find_user_id_by_name_zip", "get_user_details"]
    assert [m["role"] for m in ep.messages[first + 1 : first + 3]] == ["tool", "tool"]
    assert ep.messages[first + 2]["name"] == "get_user_details" and not ep.messages[first + 2]["error"]
    assert ep.reward == 1.0 and record(ep)["multi_call_turns"] == 1


def record(ep):
    return rollout_record(ep, parse_args(["--env", "tau2"]))


def test_unknown_domain_split_and_task_are_one_line_errors():
    with pytest.raises(
        SystemExit, match=r"^error: unknown τ²-bench domain 'shop' \(choose from retail, airline, telecom, mock\)$"
    ):
        list_tasks(["shop"], "test")
    with pytest.raises(SystemExit, match=r"^error: τ²-bench domain retail has no split 'valid'"):
        list_tasks(["retail"], "valid")
    with pytest.raises(SystemExit, match=r"^error: unknown τ²-bench task 'retail/9999'$"):
        list_tasks(["retail"], "test", ids=["9999"])
    assert len(list_tasks(["retail", "telecom", "airline"], "test")) == 100  # 40 + 40 + 20, as in the paper's tables
    assert list_tasks(["retail", "airline"], "test", n=4) == ["retail/5", "airline/2", "retail/9", "airline/6"]
    with pytest.raises(SystemExit, match=r"^error: τ²-bench task 'airline/8' is not in --domain retail$"):
        list_tasks(["retail"], "test", ids=["airline/8"])


def test_named_tasks_are_played_in_their_own_domains_column_only():
    import evaluate

    args = evaluate.parse_args(["--env", "tau2", "--domain", "retail", "airline", "--tasks", "airline/8", "5", "5"])
    column = lambda d: evaluate.column_games(args, dict(split="test", domain=[d]))
    assert column("retail") == ["retail/5"] and column("airline") == ["airline/8"]  # a bare id: the first domain's
    args.tasks = ["retail/5"]
    assert column("retail") == ["retail/5"] and column("airline") == []  # no column for a domain without tasks


# ---- the tiny model as agent and user on tau2's small `mock` domain (short prompts: fast on CPU) ----
ROLLOUT = {
    "env",
    "game",
    "split",
    "task_type",
    "task",
    "episode",
    "won",
    "reward",
    "steps",
    "invalid",
    "cut_turns",
    "call_turns",
    "calls_with_text",
    "multi_call_turns",
    "termination",
    "reward_info",
    "turns",
    "messages",
    "policy",
    "epsilon",
    "model",
    "user_model",
    "seed",
}
TRIPLET = {"id", "env", "game", "task", "history", "state", "action", "next_state", "kind", "valid"}


@pytest.fixture(scope="module")
def mock_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("collect_tau2")
    args = parse_args(
        [
            "--env",
            "tau2",
            "--domain",
            "mock",
            "--split",
            "train",
            "--games",
            "2",
            "--episodes",
            "1",
            "--max-steps",
            "3",
            "--max-new-tokens",
            "24",
            "--user-max-new-tokens",
            "24",
            "--out",
            str(out),
        ]
    )  # the user: a frozen copy of --model (local:smollm2-135m), loaded once
    return args, collect(args, *tiny), out


def test_tiny_model_episodes_run_to_their_step_limit_and_write_schema_valid_records(mock_run):
    args, rollouts, out = mock_run
    rows = [json.loads(line) for line in open(out / "rollouts.jsonl")]
    assert rows == rollouts and [r["game"] for r in rows] == [
        "mock/create_task_1",
        "mock/create_task_1_with_env_assertions",
    ]
    for r in rows:
        assert set(r) == ROLLOUT and r["termination"] == "max_steps" and r["steps"] == 1 and r["reward"] == 0.0
        assert [m["role"] for m in r["messages"]][:2] == [
            "assistant",
            "user",
        ]  # tau2's greeting, then the user simulator
        assert r["user_model"] == "local:smollm2-135m" and all(
            {"output", "action", "valid"} == set(t) for t in r["turns"]
        )
    stats = summary(rows)  # every episode ended by the step limit; the turns the token limit cut, counted
    assert stats["step_limit_rate"] == 1.0 and stats["cut_turn_rate"] == sum(r["cut_turns"] for r in rows) / 2
    replies = [m for r in rows for m in r["messages"] if "output" in m]  # the agent's, as it wrote them
    assert stats["call_turns"] == sum(bool(m.get("tool_calls")) for m in replies) <= len(replies)
    triplets = [json.loads(line) for line in open(out / "triplets.jsonl")]
    # 3 orchestrator steps (τ²'s count, after the greeting): user, agent, user or tool (an episode of several agent
    # turns, each state holding the turns before it: the gold-replay tests above)
    assert len(triplets) == 2 and len({t["id"] for t in triplets}) == 2
    for t in triplets:
        assert set(t) == TRIPLET and t["env"] == "tau2" and t["kind"] in ("user", "tool") and t["next_state"]
        assert t["state"].startswith("<instructions>") and '"name": "create_task"' in t["state"]  # mock's tools
    assert (out / "metrics.png").exists()
    again = collect(
        parse_args(
            [
                "--env",
                "tau2",
                "--domain",
                "mock",
                "--split",
                "train",
                "--games",
                "2",
                "--episodes",
                "1",
                "--out",
                str(out),
                "--resume",
            ]
        )
    )  # nothing left to play: no model is even loaded
    assert again == rollouts and len(open(out / "triplets.jsonl").readlines()) == 2


def test_rwml_trains_on_tau2_triplets(mock_run, tmp_path):
    import train_wm

    _, _, out = mock_run
    args = train_wm.parse_args(
        [
            "--triplets",
            str(out / "triplets.jsonl"),
            "--out",
            str(tmp_path),
            "--batch-size",
            "1",
            "--group-size",
            "2",
            "--max-new-tokens",
            "8",
            "--max-steps",
            "1",
            "--val-size",
            "1",
            "--lora-rank",
            "4",
            "--micro-batch",
            "1",
            "--beta",
            "0",
            "--no-start-eval",
        ]
    )  # τ²'s states are ~2k tokens: one sequence a pass; no reference pass (the KL term: tests/test_grpo.py)
    rows = train_wm.main(args)
    assert args.tau == 0.4  # the paper's tau_d for τ²-bench
    assert [r["step"] for r in rows] == [1] and 0 <= rows[0]["train/reward"] <= 1 and "heldout/reward" in rows[0]
    assert (tmp_path / "checkpoint" / "model" / "config.json").exists()


def test_policy_rl_and_evaluation_on_tau2(tiny, tmp_path):
    import evaluate
    import train_policy

    args = train_policy.parse_args(
        [
            "--env",
            "tau2",
            "--domain",
            "mock",
            "--games",
            "1",
            "--games-per-step",
            "1",
            "--group-size",
            "2",
            "--updates",
            "1",
            "--max-steps",
            "2",
            "--max-new-tokens",
            "8",
            "--user-max-new-tokens",
            "8",
            "--lora-rank",
            "4",
            "--out",
            str(tmp_path / "policy"),
        ]
    )
    rows = train_policy.main(args)
    rollouts = [json.loads(line) for line in open(tmp_path / "policy" / "rollouts.jsonl")]
    assert len(rollouts) == 2 and {r["game"] for r in rollouts} == {"mock/create_task_1"}
    assert all(r["step"] == 1 and r["user_model"] == "local:smollm2-135m" for r in rollouts)  # the fixed user
    assert rows[0]["groups"] == 1 and rows[0]["success"] == 0.0 and rows[0]["no_signal_groups"] == 1
    assert not rows[0]["updated"]
    ev = evaluate.parse_args(
        [
            "--env",
            "tau2",
            "--domain",
            "mock",
            "--games",
            "1",
            "--runs",
            "1",
            "--max-steps",
            "2",
            "--max-new-tokens",
            "8",
            "--user-max-new-tokens",
            "8",
            "--out",
            str(tmp_path / "eval"),
        ]
    )  # the user: a frozen copy of the first --model
    evaluate.check_args(ev)
    results = evaluate.evaluate(ev, *tiny, "base", tmp_path / "eval", user=tiny)
    assert list(results["splits"]) == ["mock"] and results["splits"]["mock"]["games"] == 1
    mock = results["splits"]["mock"]
    assert (
        mock["tau2"] == {"avg_reward": 0.0, "pass^1": 0.0} and sum(sum(v) for v in mock["terminations"].values()) == 1
    )
    played = [json.loads(line) for line in open(tmp_path / "eval" / "run0" / "mock" / "rollouts.jsonl")]
    assert {r["user_model"] for r in played} == {"local:smollm2-135m"}
    md = report.table([results, dict(results, name="again")]).splitlines()
    assert md[:4] == ["| Method | Mock |", "|---|---|", "| base | 0.0 ± 0.0 |", "| again | 0.0 ± 0.0 |"]
    assert md[5] == "User simulator: local:smollm2-135m (temperature 0), the same for every row"
    assert md[7:10] == [
        "| Method | Domain | Avg reward | pass^1 |",
        "|---|---|---|---|",
        "| base | mock | 0.000 | 0.000 |",
    ]
    assert md[12:14] == ["| Method | Split | Invalid tool calls (%) | Mean steps |", "|---|---|---|---|"]
    assert md[-1].startswith("Agent sampling temperature 0.4 (evaluate.py --temperature; its default 0.4 is the")


def test_an_episode_whose_next_prompt_outgrows_the_plan_ends_as_prompt_too_long(tiny):
    from collect import play, play_settings
    from support.tau2_env import tau2_rollout_record

    args = parse_args(["--env", "tau2", "--domain", "mock", "--max-new-tokens", "8", "--user-max-new-tokens", "8"])
    settings = play_settings(args, max_prompt_tokens=200)  # mock's opening prompt alone is longer
    (ep,) = play([("mock/create_task_1", "train", 0)], *tiny, settings, user=tiny)
    rec = tau2_rollout_record(ep, settings)
    assert rec["termination"] == "prompt_too_long" and rec["reward"] == 0.0 and rec["steps"] == 0
    assert [m["role"] for m in rec["messages"]] == ["assistant", "user"]  # the greeting, the user's first message
    assert rec["reward_info"]["note"] == "Simulation terminated prematurely. Termination reason: agent_error"


def test_tau2s_own_metrics_and_both_averages_are_reported():

    wins = {"create_task_1": [1, 1, 0], "update_task_1": [1, 1, 1]}  # two tasks, three runs (trials)
    runs = [
        [dict(game=f"mock/{t}", reward=float(w[r]), termination="user_stop") for t, w in wins.items()] for r in range(3)
    ]
    # pass^k = C(successes, k) / C(trials, k), averaged over tasks: (2/3 + 1) / 2, (1/3 + 1) / 2, (0 + 1) / 2
    assert tau2_metrics("mock", runs) == pytest.approx(
        {"avg_reward": 5 / 6, "pass^1": 5 / 6, "pass^2": 2 / 3, "pass^3": 1 / 2}
    )
    column = lambda success, games: dict(
        games=games, success=success, invalid_rate=[0.0], mean_steps=[9], per_task_type={}, tau2={"avg_reward": 0.5}
    )
    results = dict(
        name="m",
        env="tau2",
        temperature=0.4,
        user_model="gpt-4.1",
        user_temperature=0.0,
        splits=dict(retail=column([0.5], 40), airline=column([0.2], 20)),
    )
    md = report.table([results]).splitlines()
    assert md[0] == "| Method | Retail | Airline | AVG (mean of domains) | AVG (over tasks) |"
    assert md[2] == "| m | 50.0 ± 0.0 | 20.0 ± 0.0 | 35.0 ± 0.0 | 40.0 ± 0.0 |"  # (20 + 4) / 60 tasks over tasks


def test_the_step_limit_is_tau2s_own():
    import tau2.config

    import collect
    import train_policy
    from support import play

    assert play.TAU2_MAX_STEPS == tau2.config.DEFAULT_MAX_STEPS == 200
    for script in (collect, train_policy):
        args = script.parse_args(["--env", "tau2"])
        assert (args.max_steps, args.max_new_tokens) == (200, play.AGENT_TOKENS["tau2"])
    assert collect.parse_args([]).max_steps == 30 and train_policy.parse_args([]).max_steps == 15  # ALFWorld


def test_one_fixed_user_by_default_and_self_play_only_when_asked_for(tmp_path):
    import torch

    import evaluate
    import train_policy
    from conftest import run_script
    from support import play

    assert parse_args(["--env", "tau2"]).user_model == "local:smollm2-135m"  # a frozen copy of --model
    assert train_policy.parse_args(["--env", "tau2", "--model", "Qwen/Qwen3-8B"]).user_model == "local:Qwen/Qwen3-8B"
    first = evaluate.parse_args(["--env", "tau2", "--model", "Base=Qwen/Qwen3-8B", "RWML=runs/x/checkpoint/model"])
    assert first.user_model == "local:Qwen/Qwen3-8B"  # one user for every row: the first model's frozen copy
    # a trained checkpoint is never its own user: the default follows its runs back to the model they started from
    for run, start in (("rwml", "smollm2-135m"), ("rwml_policy_rl", str(tmp_path / "rwml" / "checkpoint" / "model"))):
        (tmp_path / run / "checkpoint").mkdir(parents=True)
        torch.save(dict(step=1, args=dict(model=start)), tmp_path / run / "checkpoint" / "trainer.pt")
    assert play.base_model(str(tmp_path / "rwml_policy_rl" / "checkpoint" / "model")) == "smollm2-135m"
    assert play.base_model("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    users = parse_args(["--env", "tau2", "--user-model", "gpt-4.1", "local:smollm2-135m"])  # collect.py's
    assert users.users == ["gpt-4.1", "local:smollm2-135m"] and users.user_model == "local:smollm2-135m"
    assert parse_args(["--env", "tau2", "--user-model", "gpt-4.1"]).user_model == "gpt-4.1"
    assert parse_args(["--env", "tau2", "--self-user"]).user_model == "self"
    base = ["--env", "tau2", "--domain", "mock", "--games", "1", "--out", tmp_path / "eval"]
    for flags in (["--user-model", "local"], ["--self-user", "--user-model", "gpt-4.1"], ["--user-model", "a", "b"]):
        r = run_script("evaluate.py", *base, *flags)
        assert r.returncode == 1 and r.stderr.startswith("error: --user-model: "), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "eval").exists()


def test_make_pipeline_env_tau2_plays_every_stage_against_one_fixed_user():
    """The Makefile's τ² plumbing (the stages themselves run above and in the ALFWorld pipeline test)."""

    def steps(*variables):
        make = ["make", "-n", "pipeline", "PYTHON=python", "ENV=tau2", "BUDGET=paper", "MODEL=Qwen/Qwen3-8B"]
        r = subprocess.run([*make, *variables], cwd=ROOT, capture_output=True, text=True, check=True)
        return [line for line in r.stdout.splitlines() if line.startswith("python ") and ".py" in line]

    played = lambda run: [s for s in run if s.split()[1] in ("collect.py", "train_policy.py") or "--env tau2" in s]
    default, api, official = steps(), steps("USER_MODEL=gpt-4.1"), steps("OFFICIAL=1")
    assert [s.split()[1] for s in default] == [
        "collect.py",
        *["train_wm.py"] * 5,  # split, pi', filter, RWML, WM SFT
        "evaluate.py",  # --wm
        *["train_policy.py"] * 4,  # RFT, Policy RL from the base model, from WM SFT, from RWML
        "evaluate.py",  # Table 1's τ² columns
        "evaluate.py",  # --forgetting
    ]  # no ALFWorld calibration
    env = "--env tau2 --domain retail telecom airline --user-model "
    qwen = "hosted_vllm/Qwen/Qwen3-235B-A22B-Instruct-2507"
    assert default[0].startswith(f"python collect.py --model Qwen/Qwen3-8B {env}gpt-4.1 {qwen} ")  # C.1: two users
    assert "--episodes 6" in default[0]  # 3 with each
    assert len(played(default)) == 6 and all(env + qwen + " " in s for s in played(default)[1:])
    assert all(env + "gpt-4.1 " in s for s in played(api)) and played(api)[-1] == api[-2]  # and the evaluation
    rwml = next(s for s in default if "--mode rwml" in s)
    assert "--group-size 16" in rwml  # the paper's RWML group on τ² (C.1)
    policy = [s for s in default if "train_policy.py" in s]
    assert all("--group-size" not in s and "--max-steps 30" in s for s in policy)  # G 8, 200 updates (defaults), C.2
    assert "runs/pipeline_tau2/eval" in default[-2] and "--runs 3 --max-steps 30" in default[-2]  # Table 1
    assert f"{env}gpt-4.1 " in official[-2] and "--max-steps 100" in official[-2]  # Table A3: τ²'s official setting
    assert "--max-steps 30" not in official[-2]
    make = ["make", "-n", "pipeline", "PYTHON=python", "ENV=tau2"]
    r = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, check=True)
    offline = [line for line in r.stdout.splitlines() if line.startswith("python ") and "--env tau2" in line]
    assert offline and all("--user-model local:smollm2-135m " in s for s in offline)  # one frozen local user
