"""τ²-bench through the project's adapter: real tau2 domains, Orchestrator and evaluator, offline."""

import json
import subprocess

import pytest

from collect import collect, parse_args, rollout_record, triplet_records
from conftest import ROOT
from support.episode import summary
from support.tau2_env import list_tasks, mask_json, parse_reply, start_tau2, step_tau2, tool_call_text


def replay(name, drop_last_write=False, tok=None):
    """Drive the adapter (the model's agent and local user classes, step_tau2) with scripted replies instead
    of sampled ones: the user makes the task's own gold tool calls (telecom: on their phone) and asks, the
    agent makes the task's gold tool calls and tells the user what the task says it must, the user stops.
    `drop_last_write` leaves out the agent's last call that changes the database. With `tok`, the local user's
    chat prompt at each of its turns is kept in `ep.user_prompts`."""
    from tau2.environment.toolkit import ToolType
    from tau2.orchestrator.orchestrator import Role

    ep = start_tau2(name, "test", 0, seed=0, user_model="local")
    task, tools = ep.orch.task, ep.orch.environment.tools
    gold = task.evaluation_criteria.actions
    actions = [a for a in gold if a.requestor == "assistant"]
    if drop_last_write:
        del actions[[i for i, a in enumerate(actions) if tools.tool_type(a.name) == ToolType.WRITE][-1]]
    agent = [tool_call_text(dict(name=a.name, arguments=a.arguments)) for a in actions]
    agent.append(" ".join(task.evaluation_criteria.communicate_info or []) or "Your request is done.")
    user = [tool_call_text(dict(name=a.name, arguments=a.arguments)) for a in gold if a.requestor == "user"]
    user.append("I need help, please.")
    ep.user_prompts = []
    while not ep.done:
        if ep.orch.to_role == Role.AGENT:
            ep.orch.agent.reply = agent.pop(0)
        elif ep.orch.to_role == Role.USER:
            if tok:
                ep.user_prompts.append(ep.orch.user.prompt(tok, ep.orch.message, ep.orch.user_state))
            ep.orch.user.reply = user.pop(0) if user else "Thanks, that's all. ###STOP###"
        step_tau2(ep, max_steps=200)
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


def test_the_local_user_sees_tau2s_prompt_its_phone_tools_and_their_results(tiny):
    ep = replay(TELECOM, tok=tiny[1])
    first, second, last = ep.user_prompts[0], ep.user_prompts[1], ep.user_prompts[-1]
    assert "<scenario>" in first and "toggle_airplane_mode" in first  # tau2's user prompt, then the phone's tools
    assert first.rstrip().endswith(
        "Hi! How can I help you today?<|im_end|>\n<|im_start|>assistant"
    )  # the agent, as "user"
    assert (
        '<tool_call>{"name": "toggle_airplane_mode"' in second and "Tool result: " in second
    )  # its own call and the phone's answer
    assert '"name": "refuel_data"' not in last and ep.turns[0]["action"].startswith(
        '<tool_call>{"name": "refuel_data"'
    )  # the agent's side


def test_gold_replay_triplets_mask_tool_answers_to_their_schema():
    ep = replay("retail/5")
    rollout = rollout_record(ep, parse_args(["--env", "tau2"]))
    triplets = triplet_records(rollout, 2)
    tools = [t for t in triplets if t["kind"] == "tool"]
    assert len(tools) == len(ep.turns) - 1 == 5  # five gold tool calls, then the message to the user
    assert [t["kind"] for t in triplets][-1] == "user" and triplets[-1]["next_state"].endswith("###STOP###")
    for t in tools:
        assert (
            t["action"].startswith("<tool_call>")
            and "The conversation so far" in t["state"]
            and "Policy:" in t["state"]
        )
    # a real answer (get_order_details): every leaf is a type name, every key stays
    real = next(m["content"] for m in rollout["messages"] if m.get("name") == "get_order_details")
    masked = json.loads(next(t["next_state"] for t in tools if "get_order_details" in t["action"]))

    def leaves(v):
        return (
            [x for y in v.values() for x in leaves(y)]
            if isinstance(v, dict)
            else [x for y in v for x in leaves(y)]
            if isinstance(v, list)
            else [v]
        )

    def keys(v):
        return (
            {k for k, y in v.items() for k in [k, *keys(y)]}
            if isinstance(v, dict)
            else {k for y in v for k in keys(y)}
            if isinstance(v, list)
            else set()
        )

    assert keys(masked) == keys(json.loads(real)) and set(leaves(masked)) <= {"str", "int", "float", "bool", "null"}
    assert (
        mask_json(json.dumps({"price": 342.81, "items": [{"ok": True}], "note": None}))
        == '{"price": "float", "items": [{"ok": "bool"}], "note": "null"}'
    )
    assert mask_json("yusuf_rossi_9620") == "str"  # a plain value is masked too


def test_parse_reply_tool_calls_messages_and_invalid_calls():
    names = {"get_order_details"}
    content, calls, valid = parse_reply(
        '<think>look it up</think><tool_call>{"name": "get_order_details", '
        '"arguments": {"order_id": "#W1"}}</tool_call>',
        names,
    )
    assert (
        content is None and valid and calls[0].name == "get_order_details" and calls[0].arguments == {"order_id": "#W1"}
    )
    assert parse_reply("Sure, what is your zip code?", names) == ("Sure, what is your zip code?", None, True)
    for bad in [
        '<tool_call>{"name": "get_order_details", "arguments": {"order_id": </tool_call>',  # not JSON
        '<tool_call>{"name": "drop_database", "arguments": {}}</tool_call>',  # unknown tool
        '<tool_call>{"name": "get_order_details"}</tool_call>',  # no arguments
        '<tool_call>{"name": ["get_order_details"], "arguments": {}}</tool_call>',  # a name that is not a string
        '<tool_call>["get_order_details", {}]</tool_call>',  # not an object
        '<tool_call>{"name": "get_order_details", "arguments": {"order_id": "#W1"}',
    ]:  # cut off
        content, calls, valid = parse_reply(bad, names)
        assert calls is None and not valid and content == bad  # sent to the user as text, recorded invalid
    assert parse_reply("<think>never closed", names) == ("(no message)", None, False)


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
            "5",
            "--max-new-tokens",
            "24",
            "--out",
            str(out),
        ]
    )
    return args, collect(args, *tiny), out


def test_tiny_model_episodes_run_to_their_step_limit_and_write_schema_valid_records(mock_run):
    args, rollouts, out = mock_run
    rows = [json.loads(line) for line in open(out / "rollouts.jsonl")]
    assert rows == rollouts and [r["game"] for r in rows] == [
        "mock/create_task_1",
        "mock/create_task_1_with_env_assertions",
    ]
    for r in rows:
        assert set(r) == ROLLOUT and r["termination"] == "max_steps" and r["steps"] == 2 and r["reward"] == 0.0
        assert [m["role"] for m in r["messages"]][:2] == [
            "assistant",
            "user",
        ]  # tau2's greeting, then the user simulator
        assert r["user_model"] == "local" and all({"output", "action", "valid"} == set(t) for t in r["turns"])
    stats = summary(rows)  # every episode ended by the step limit; the turns the token limit cut, counted
    assert stats["step_limit_rate"] == 1.0 and stats["cut_turn_rate"] == sum(r["cut_turns"] for r in rows) / 4
    triplets = [json.loads(line) for line in open(out / "triplets.jsonl")]
    # 5 orchestrator steps (τ²'s count, after the greeting): user, agent, user or tool, agent, user or tool
    assert len(triplets) == 4 and len({t["id"] for t in triplets}) == 4
    for t in triplets:
        assert set(t) == TRIPLET and t["env"] == "tau2" and t["kind"] in ("user", "tool") and t["next_state"]
        assert t["state"].startswith("Policy:") and "create_task" in t["state"]  # the mock domain's policy and tools
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
    assert again == rollouts and len(open(out / "triplets.jsonl").readlines()) == 4


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
            "16",
            "--max-steps",
            "1",
            "--val-size",
            "1",
            "--lora-rank",
            "4",
            "--micro-batch",
            "1",
            "--grad-checkpointing",
            "--no-start-eval",
        ]
    )  # τ²'s states are ~2k tokens: one sequence a pass, checkpointed, keeps the update near 1 GB
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
            "16",
            "--lora-rank",
            "4",
            "--out",
            str(tmp_path / "policy"),
        ]
    )
    rows = train_policy.main(args)
    rollouts = [json.loads(line) for line in open(tmp_path / "policy" / "rollouts.jsonl")]
    assert (
        len(rollouts) == 2
        and {r["game"] for r in rollouts} == {"mock/create_task_1"}
        and all(r["step"] == 1 for r in rollouts)
    )
    assert (
        rows[0]["groups"] == 1
        and rows[0]["success"] == 0.0
        and rows[0]["no_signal_groups"] == 1
        and not rows[0]["updated"]
    )
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
            "4",
            "--max-new-tokens",
            "16",
            "--user-model",
            "local:smollm2-135m",
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    evaluate.check_args(ev)
    results = evaluate.evaluate(ev, *tiny, "base", tmp_path / "eval", user=tiny)  # the base model: a fixed user
    assert list(results["splits"]) == ["mock"] and results["splits"]["mock"]["games"] == 1
    played = [json.loads(line) for line in open(tmp_path / "eval" / "run0" / "mock" / "rollouts.jsonl")]
    assert {r["user_model"] for r in played} == {"local:smollm2-135m"}
    md = evaluate.table([results, dict(results, name="again")]).splitlines()
    assert md[:4] == ["| Method | Mock |", "|---|---|", "| base | 0.0 ± 0.0 |", "| again | 0.0 ± 0.0 |"]
    assert md[5] == "User simulator: local:smollm2-135m (temperature 0), the same for every row"
    assert md[7:10] == [
        "| Method | Split | Invalid tool calls (%) | Mean steps |",
        "|---|---|---|---|",
        "| base | mock | 0.0 ± 0.0 | 2.0 |",
    ]


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


def test_evaluation_refuses_a_user_played_by_each_rows_own_model_unless_asked(tmp_path):
    from conftest import run_script

    base = ["--env", "tau2", "--domain", "mock", "--games", "1", "--out", tmp_path / "eval"]
    r = run_script("evaluate.py", *base)
    assert r.returncode == 1 and r.stderr.startswith("error: τ² evaluation needs one fixed user for every row")
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "eval").exists()
    import evaluate

    evaluate.check_args(evaluate.parse_args([*map(str, base), "--allow-self-user"]))  # asked for: allowed


def test_make_pipeline_env_tau2_runs_every_stage_on_tau2():
    """The Makefile's τ² plumbing (the stages themselves run above and in the ALFWorld pipeline test)."""
    r = subprocess.run(
        [
            "make",
            "-n",
            "pipeline",
            "PYTHON=python",
            "ENV=tau2",
            "BUDGET=paper",
            "MODEL=Qwen/Qwen3-8B",
            "USER_MODEL=gpt-4.1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    steps = [line for line in r.stdout.splitlines() if line.startswith("python ") and ".py" in line]
    env = "--env tau2 --domain retail telecom airline --user-model gpt-4.1"
    assert [s.split()[1] for s in steps] == [
        "collect.py",
        "train_wm.py",
        "train_wm.py",
        "train_wm.py",
        "train_policy.py",
        "train_policy.py",
        "train_policy.py",
        "evaluate.py",
        "evaluate.py",
    ]  # no ALFWorld calibration
    assert all(env in s for s in steps if s.split()[1] in ("collect.py", "train_policy.py")) and env in steps[-1]
    assert "--mode rwml" in steps[2] and "--group-size 16" in steps[2]  # the paper's RWML group on τ²
    assert "runs/pipeline_tau2/eval" in steps[-1]
