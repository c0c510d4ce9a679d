"""Interaction learning on the real ALFWorld engine with the real tiny model."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from collect import (
    act,
    collect,
    parse_action,
    parse_args,
    random_command,
    select_games,
    start,
)
from conftest import ROOT, run_script
from support.alfworld_env import list_games, make_env, reuse_translations, split_intro, task_type
from support.runs import read_jsonl
from support.schema import ROLLOUT, TRIPLET

ROLLOUT_FIELDS = (
    *("env", "game", "split", "task_type", "task", "episode", "won", "steps", "invalid", "turns"),
    *("policy", "epsilon", "model", "seed"),
)
TURN_FIELDS = ("observation", "output", "action", "valid", "behaviour")
TRIPLET_FIELDS = ("id", "env", "game", "task", "history", "state", "action", "next_state", "valid")


def first_game_of_each_type(split):
    seen = {}
    for g in list_games(split):
        seen.setdefault(task_type(g), g)
    return seen


def test_expert_plan_wins_every_task_type():
    games = first_game_of_each_type("valid_unseen")
    assert len(games) == 6
    for game in games.values():
        env = make_env(game, max_steps=50, expert=True)
        _, info = env.reset()
        done, steps = False, 0
        while not done:
            _, _, done, info = env.step(info["extra.expert_plan"][0])
            steps += 1
        env.close()
        assert info["won"], game
        assert steps < 50


def test_reused_translations_and_parses_play_as_textworlds_own():
    import fast_downward
    import textworld.envs.pddl.textgen as textgen
    import textworld.logic as logic

    def play(commands):  # the observations and admissible commands along the planner's plan, or these commands
        env = make_env(list_games("train", 1)[0], max_steps=50, expert=True)
        obs, info = env.reset()
        seen, done = [(obs, info["admissible_commands"])], False
        while not done:
            cmd = info["extra.expert_plan"][0] if commands is None else commands[len(seen) - 1]
            obs, _, done, info = env.step(cmd)
            seen.append((cmd, obs, info["admissible_commands"]))
        env.close()
        assert info["won"]
        return seen

    reuse_translations()
    ours = fast_downward.pddl2sas, textgen._parse_and_convert, logic._parse_and_convert
    fast_downward.pddl2sas, textgen._parse_and_convert, logic._parse_and_convert = (f.__wrapped__ for f in ours)
    try:
        own = play(None)  # with TextWorld's own functions
    finally:
        fast_downward.pddl2sas, textgen._parse_and_convert, logic._parse_and_convert = ours
    ours[0].cache_clear()
    fresh = play([s[0] for s in own[1:]])  # translated now, then used through a whole episode
    assert fast_downward.pddl2sas.cache_info().misses == 2
    again = play([s[0] for s in own[1:]])
    assert fast_downward.pddl2sas.cache_info().misses == 2 and again == fresh == own


def test_parse_action():
    assert parse_action("<think>the desk</think><action> Go To  Desk 1</action>") == "go to desk 1"
    assert parse_action("<action>look</action> no, <action>inventory</action>") == "inventory"
    assert parse_action("I would go to the desk") == ""
    assert parse_action("<action>open fridge 1") == ""


def test_output_without_tags_is_an_invalid_action_not_a_crash():
    game = list_games("valid_seen", 1)[0]
    ep = start(game, "valid_seen", 0, seed=0, max_steps=5)
    before = ep.observation
    act(ep, "I think I should open the fridge.", parse_action("I think I should open the fridge."), "model")
    turn = ep.turns[-1]
    assert (turn["action"], turn["valid"], turn["observation"]) == ("", False, before)
    assert ep.observation == "Nothing happens." and not ep.done
    act(ep, None, ep.admissible[0], "random")  # the game goes on
    assert ep.turns[-1]["valid"] and ep.observation != "Nothing happens."
    ep.env.close()


def test_collect_with_the_tiny_model_writes_schema_valid_records(tiny, tmp_path):
    """Collected triplets hold the state with the last H turns of history and the next state the engine returns:
    every action replayed in a fresh game gives it."""
    args = parse_args(
        [
            "--split",
            "train",
            "--games",
            "2",
            "--episodes",
            "1",
            "--max-steps",
            "3",
            "--epsilon",
            "0.5",
            "--invalid-triplets",
            "keep",  # every turn a triplet (the tiny model's own actions are invalid): the replay below checks all
            "--max-new-tokens",
            "24",
            "--seed",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    collect(args, *tiny)
    rollouts = read_jsonl(tmp_path / "rollouts.jsonl", required=ROLLOUT_FIELDS)
    triplets = read_jsonl(tmp_path / "triplets.jsonl", required=TRIPLET_FIELDS)
    assert len(rollouts) == 2 and len(triplets) == 6
    assert Counter(t["behaviour"] for r in rollouts for t in r["turns"]).keys() == {"model", "random"}
    for r in rollouts:
        assert r["steps"] == len(r["turns"]) == 3 and r["model"] == "smollm2-135m"
        for t in r["turns"]:
            assert set(TURN_FIELDS) <= t.keys()
            assert isinstance(t["output"], str) if t["behaviour"] == "model" else t["output"] is None
        # the triplet's next_state is what the engine returns: replay the recorded actions in a fresh env
        env = make_env(os.path.join(os.environ["ALFWORLD_DATA"], r["game"], "game.tw-pddl"), 3)
        obs, _ = env.reset()
        mine = [t for t in triplets if t["game"] == r["game"]]
        assert mine[0]["state"] == split_intro(obs)[0] and mine[0]["history"] == []
        for i, trip in enumerate(mine):
            obs, _, _, _ = env.step(trip["action"])
            assert trip["next_state"] == obs.strip()
            assert trip["history"] == [[t["observation"], t["action"]] for t in r["turns"][max(0, i - 2) : i]]
        env.close()
    metrics = read_jsonl(tmp_path / "metrics.jsonl", required=["step", "success", "invalid_rate"])
    assert len(metrics) == 2 and (tmp_path / "metrics.png").exists()


def interruptible():
    """In the child before it runs: SIGINT at its default and unblocked (a disposition of SIG_IGN or a blocked
    mask is inherited across exec, and Python installs its KeyboardInterrupt handler only over the default)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def collect_argv(out, *extra):
    flags = "--policy random --split valid_seen --games 2 --episodes 2 --max-steps 4 --batch-games 2"
    return ["collect.py", *flags.split(), "--out", str(out), *extra]


def rollouts(path):
    return sorted((json.loads(l) for l in open(path)), key=lambda r: (r["game"], r["episode"]))


def test_kill_and_resume_gives_the_same_episodes_once(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert run_script(*collect_argv(ref)).returncode == 0  # the runs that end by themselves run in this process
    proc = subprocess.Popen(  # the one to kill runs in its own
        [sys.executable, *collect_argv(cut)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    while not (cut / "rollouts.jsonl").exists() or (cut / "rollouts.jsonl").read_text().count("\n") < 2:
        assert proc.poll() is None, "finished before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(rollouts(cut / "rollouts.jsonl")) < 4
    # the worst moments to die: triplets of an unfinished episode written, half a rollout line written
    unfinished = {f"{r['game']}#{r['episode']}" for r in rollouts(ref / "rollouts.jsonl")} - {
        f"{r['game']}#{r['episode']}" for r in rollouts(cut / "rollouts.jsonl")
    }
    stray = [l for l in open(ref / "triplets.jsonl") if json.loads(l)["id"].rsplit("#", 1)[0] in unfinished][:2]
    with open(cut / "triplets.jsonl", "a") as f:
        f.writelines(stray)
    with open(cut / "rollouts.jsonl", "a") as f:
        f.write('{"env": "alfworld", "game": "json_2.1.1/valid_')
    r = run_script(*collect_argv(cut, "--resume"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert rollouts(cut / "rollouts.jsonl") == rollouts(ref / "rollouts.jsonl")
    assert sorted(open(cut / "triplets.jsonl")) == sorted(open(ref / "triplets.jsonl"))
    assert len(open(cut / "metrics.jsonl").readlines()) == 4


def test_ctrl_c_is_one_line_with_the_resume_command_and_leaves_whole_lines(tmp_path):
    out = tmp_path / "cut"
    argv = collect_argv(out, "--games", "4")  # the later --games wins: 8 episodes, time to interrupt
    proc = subprocess.Popen(
        [sys.executable, *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=interruptible,  # as a terminal starts it: the test runner's own SIGINT settings not inherited
    )
    while not (out / "rollouts.jsonl").exists() or not (out / "rollouts.jsonl").read_text():
        assert proc.poll() is None, "finished before it could be interrupted"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    err = proc.communicate()[1]
    last, resume = err.strip().splitlines()[-1], f"python {' '.join(argv)} --resume"
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert last == f"interrupted: its records in {out} end on whole lines; continue with: {resume}"
    for name in ("rollouts.jsonl", "triplets.jsonl", "metrics.jsonl"):
        text = (out / name).read_text()
        assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines()), name
    assert 1 <= len(read_jsonl(out / "rollouts.jsonl", ROLLOUT)) < 8 and read_jsonl(out / "triplets.jsonl", TRIPLET)


@pytest.mark.parametrize(
    "extra, env, message",
    [
        (["--split", "nope"], {}, "unknown ALFWorld split 'nope'"),
        (["--split", "train"], {"ALFWORLD_DATA": "/nonexistent"}, "ALFWorld data not found: /nonexistent"),
    ],
)
def test_bad_input_is_a_one_line_error(extra, env, message):
    r = subprocess.run(
        [sys.executable, str(ROOT / "collect.py"), "--policy", "random", "--out", "/tmp/unused", *extra],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), r.stderr


def test_malformed_jsonl_names_the_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"id": 1, "state": "a"}\n{"id": 2, "state"\n')
    with pytest.raises(SystemExit, match=r"t.jsonl:2: malformed JSON line"):
        read_jsonl(p)
    p.write_text('{"id": 1, "state": "a"}\n{"id": 2}\n')
    with pytest.raises(SystemExit, match=r"t.jsonl:2: missing field 'state'"):
        read_jsonl(p, required=["id", "state"])


def test_an_invalid_command_was_admissible_earlier_in_the_episode_but_is_not_now():
    ep = start(list_games("train", 1)[0], "train", 0, seed=0, max_steps=10)
    assert random_command(ep, 1.0)[1] == "random"  # the first turn: nothing was admissible before
    first = list(ep.admissible)
    act(ep, None, next(a for a in ep.admissible if a.startswith("go to")), "random")
    command, behaviour = random_command(ep, 1.0)
    assert behaviour == "invalid" and command in first and command not in ep.admissible
    act(ep, None, command, behaviour)
    assert ep.turns[-1]["valid"] is False and ep.observation == "Nothing happens."
    assert [random_command(ep, 0.0)[1] for _ in range(20)] == ["random"] * 20  # rate 0: never
    ep.env.close()


def test_invalid_actions_triplets_are_dropped_by_default_and_kept_on_request(tmp_path):
    """Paper B.1: invalid actions' samples are removed after collection; the rollouts keep every turn."""
    flags = "--policy random --invalid-rate 0.5 --split train --games 1 --episodes 1 --max-steps 6"
    ids = {}
    for keep in ("drop", "keep"):
        collect(parse_args([*flags.split(), "--invalid-triplets", keep, "--out", str(tmp_path / keep)]))
        ids[keep] = [t["id"] for t in read_jsonl(tmp_path / keep / "triplets.jsonl")]
    (rollout,) = read_jsonl(tmp_path / "drop" / "rollouts.jsonl")
    valid = [t["valid"] for t in rollout["turns"]]
    assert len(ids["keep"]) == len(valid) == 6 and 0 < sum(valid) < 6  # the seed plays both kinds
    assert ids["drop"] == [i for i, v in zip(ids["keep"], valid) if v]


def test_first_game_starts_later_in_the_splits_order():
    assert select_games("alfworld", "train", 2, first=3) == list_games("train")[3:5]
    assert select_games("alfworld", "train", None, first=198) == list_games("train")[198:]
