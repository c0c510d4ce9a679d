"""The paper's models' real chat templates (tests/data/chat_templates, source named there) on the tiny model's
tokenizer: the world model's prompt, its SFT target and the parsers agree on one think block."""

import copy
import json
import re
from types import SimpleNamespace

import pytest
import torch

import train_wm
from collect import parse_action
from conftest import ROOT
from reward import parse_next_state, wm_prompt
from support.lm import chat_prompt, stop_outside_thinking, strip_thinking
from support.tau2_env import agent_chat, parse_reply, render, tau2_domain

TEMPLATES = ROOT / "tests" / "data" / "chat_templates"
TRIPLET = dict(task="put a mug in the sink.", history=[], state="You are in a room.", action="go to sink 1")


@pytest.fixture(scope="module", params=["qwen3-8b", "qwen2.5-7b-instruct"])
def qwen(request, tiny):
    """The tiny tokenizer with the model's real chat template (both use ChatML's <|im_start|> / <|im_end|>)."""
    tok = copy.deepcopy(tiny[1])
    tok.chat_template = json.loads((TEMPLATES / f"{request.param}.tokenizer_config.json").read_text())["chat_template"]
    return request.param, tok


def test_the_prompt_opens_no_think_block_and_the_sft_target_is_the_one_the_template_writes(qwen):
    name, tok = qwen
    prompt = chat_prompt(tok, wm_prompt(TRIPLET))
    assert prompt.endswith("<|im_start|>assistant\n")  # Qwen3: thinking on (its default), no pre-filled empty block
    target = tok.decode(train_wm.sft_target(tok, dict(next_state="You arrive at sink 1.")), skip_special_tokens=True)
    # the template's own rendering of that answer as the assistant's turn: prompt + target, one think block
    turn = tok.apply_chat_template(
        [dict(role="user", content=wm_prompt(TRIPLET)), dict(role="assistant", content=target)], tokenize=False
    )
    assert turn.startswith(prompt + target) and turn[len(prompt) :].count("<think>") == 1, name
    assert parse_next_state(target) == "You arrive at sink 1."
    if name == "qwen3-8b":  # thinking off pre-fills the same empty block: a prompt that asks for one more
        on, off = (
            tok.apply_chat_template([dict(role="user", content="hi")], tokenize=False, add_generation_prompt=True, **k)
            for k in ({}, dict(enable_thinking=False))
        )
        assert re.fullmatch(r"<think>\s*</think>\s*", off[len(on) :]) and target.startswith(off[len(on) :])


def test_an_answer_drafted_inside_unfinished_thinking_is_not_read():
    cut = "<think>\nThe drawer opens, so <next_state>You open the drawer 1.</next_state> and <action>open drawer 1"
    assert parse_next_state(cut) is None and parse_action(cut + "</action>") == "" and strip_thinking(cut) == ""
    done = "<think>\nmaybe <next_state>no</next_state>\n</think>\n\n<next_state>You open the drawer 1.</next_state>"
    assert parse_next_state(done) == "You open the drawer 1."
    thought = "<think>\n<action>look</action>?\n</think>\n\n"
    assert parse_action(thought + "<action>open drawer 1</action>") == "open drawer 1"
    assert parse_reply('<think>\n<tool_call>{"name": "x", "arguments": {}}</tool_call>', {"x"}) == (None, None, False)


def test_a_stop_string_ends_the_answer_but_not_the_thinking(tiny):
    tok = tiny[1]
    prompt = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    stop = stop_outside_thinking(tok, ["</action>"], len(prompt))

    def stops(text):
        ids = torch.tensor([prompt + tok(text, add_special_tokens=False)["input_ids"]])
        return bool(stop(ids, None)[0])

    assert stops("<think>go</think><action>go to sink 1</action>") and stops("<action>look</action>")
    assert not stops("<think>I could write <action>look</action>")  # drafted while thinking: go on
    assert not stops("<think>a</think><action>look")


def test_each_role_thinks_or_not_through_the_templates_own_switch(qwen, tmp_path):
    """Qwen3 thinks by default: the agent's default budget makes room for its think block (--thinking on) or the
    template's switch turns it off (--thinking off); the judge answers without thinking. Qwen2.5 has no switch."""
    import collect
    import train_policy
    from reward import JUDGE_REPLY
    from support.lm import thinks
    from support.play import AGENT_TOKENS, THINKING_TOKENS

    name, tok = qwen
    qwen3 = name == "qwen3-8b"
    assert thinks(tok) == qwen3
    folder = tmp_path / name  # a model folder holding just this tokenizer: what the flags' defaults read
    tok.save_pretrained(folder)
    budget = lambda parse, *flags: parse(["--model", str(folder), *flags]).max_new_tokens
    for parse in (collect.parse_args, train_policy.parse_args):
        assert budget(parse) == AGENT_TOKENS["alfworld"] + THINKING_TOKENS * qwen3
        assert budget(parse, "--env", "tau2") == AGENT_TOKENS["tau2"] + THINKING_TOKENS * qwen3
        assert budget(parse, "--thinking", "off") == AGENT_TOKENS["alfworld"]
        assert budget(parse, "--max-new-tokens", "99") == 99
    empty = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # Qwen3's own rendering of an answer without thinking
    judge = chat_prompt(tok, "Score it.", thinking=False) + JUDGE_REPLY
    assert judge.endswith((empty if qwen3 else "<|im_start|>assistant\n") + JUDGE_REPLY)
    ep = SimpleNamespace(task="put a mug in the sink.", turns=[], observation="You are in a room.", admissible=["look"])
    agent = lambda thinking: collect.turn_prompt(tok, ep, 2, thinking)  # the ALFWorld agent's prompt
    assert agent("on").endswith("<|im_start|>assistant\n") and agent("off").endswith(empty if qwen3 else "assistant\n")
    tau2 = lambda on: render(tok, agent_chat("mock", []), tau2_domain("mock").tools, on)  # τ²'s agent, its tools
    assert tau2(True).endswith("<|im_start|>assistant\n") and tau2(False).endswith(empty if qwen3 else "assistant\n")
    assert strip_thinking("<think>\nlong thought") == ""  # a turn cut inside its thinking has no action


def test_the_tau2_agents_tools_calls_and_results_in_each_template(qwen):
    """τ²'s agent prompt (tau2_env.render) in the template's own tool format: the tools in its system block, the
    agent's call as its assistant turn, the tool's answer as a <tool_response>; the reply parsed as it writes it."""
    name, tok = qwen
    call = dict(name="get_users", arguments={})
    records = [
        dict(role="assistant", content="Hi! How can I help you today?"),
        dict(role="user", content="Who are the users?"),
        dict(role="assistant", content=None, tool_calls=[call], output="", valid=True),
        dict(role="tool", content='[{"user_id": "user_1"}]', name="get_users", requestor="assistant", error=False),
    ]
    prompt = render(tok, agent_chat("mock", records), tau2_domain("mock").tools)
    assert prompt.startswith("<|im_start|>system\n<instructions>\nYou are a customer service agent"), name
    assert "# Tools\n\nYou may call one or more functions" in prompt and '"name": "create_task"' in prompt
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_users", "arguments": {}}\n</tool_call><|im_end|>' in prompt
    )
    answer = '<tool_response>\n[{"user_id": "user_1"}]\n</tool_response>'
    assert prompt.endswith(f"<|im_start|>user\n{answer}<|im_end|>\n<|im_start|>assistant\n")
    reply = '<think>\nThe user asked.\n</think>\n\n<tool_call>\n{"name": "get_users", "arguments": {}}\n</tool_call>'
    content, calls, valid = parse_reply(reply, {"get_users"})
    assert content is None and valid and (calls[0].name, calls[0].arguments) == ("get_users", {})
