"""Policy learning on real ALFWorld episodes with the real tiny model, and the whole pipeline."""

import copy
import json
import subprocess
import sys

import pytest
import torch

import train_policy
from collect import act, parse_action, play, start, turn_prompt
from conftest import ROOT, run_script
from grpo import collate, completion_logprobs
from support.alfworld_env import list_games, make_env, task_type
from support.lm import load_model
from support.lora import add_lora
from support.play import play_settings
from support.runs import read_jsonl

G = 3


def expert_plan(game):
    """The PDDL planner's winning command sequence for a game."""
    env = make_env(game, max_steps=50, expert=True)
    _, info = env.reset()
    plan, done = [], False
    while not done:
        plan.append(info["extra.expert_plan"][0])
        _, _, done, info = env.step(plan[-1])
    env.close()
    assert info["won"]
    return plan


@pytest.fixture(scope="module")
def group(tiny):
    """One real group of G episodes of one game: a won episode (the planner's commands, written as the
    agent's <action> output at each turn) and G - 1 episodes of the tiny model, which writes no action."""
    model, tok = tiny
    game = next(g for g in list_games("train") if task_type(g) == "pick_and_place_simple")
    won = start(game, "train", 0, seed=0, max_steps=50)
    for cmd in expert_plan(game):
        output = f"<think>The next step of my plan.</think><action>{cmd}</action>"
        ids = (
            tok(turn_prompt(tok, won, 2), add_special_tokens=False)["input_ids"],
            tok(output, add_special_tokens=False)["input_ids"],
        )
        act(won, output, parse_action(output), "model", ids)
    won.env.close()
    assert won.won and all(t["valid"] for t in won.turns)
    args = train_policy.parse_args(
        ["--max-steps", "2", "--max-new-tokens", "16", "--group-size", str(G), "--games-per-step", "1"]
    )
    lost = sorted(
        play([(game, "train", i) for i in range(1, G)], model, tok, play_settings(args)), key=lambda ep: ep.index
    )
    return [won] + lost


def test_play_keeps_the_tokens_of_every_model_turn(tiny, group):
    tok = tiny[1]
    assert [ep.job for ep in group[1:]] == list(range(G - 1))  # each episode knows its job's position
    for ep in group[1:]:
        assert not ep.won and len(ep.turns) == len(ep.seqs) == 2
        for turn, (prompt_ids, completion_ids) in zip(ep.turns, ep.seqs):
            assert turn["output"] == tok.decode(completion_ids, skip_special_tokens=True)
            assert tok.decode(prompt_ids).endswith("assistant\n") and turn["observation"] in tok.decode(prompt_ids)


def test_no_game_is_played_twice_in_a_step_and_every_game_as_often_as_any_other():
    """The paper's defaults: 200 games, 16 a step (a step straddles two epochs every 25 / 2 steps), many seeds."""
    games = [f"game{i}" for i in range(200)]
    for seed in range(40):
        schedule = train_policy.game_schedule(games, 16, seed, 100)
        assert len(schedule) == 100 and all(len(set(step)) == len(step) == 16 for step in schedule), seed
        visits = dict.fromkeys(games, 0)
        for step in schedule:
            visits.update({g: visits[g] + 1 for g in step})
            assert max(visits.values()) - min(visits.values()) <= 1, seed
        assert set(visits.values()) == {8}  # 100 x 16 = 8 epochs of 200
    assert train_policy.game_schedule(games, 16, seed, 3) == schedule[:3]  # fixed by the seed (resume: the same games)
    assert train_policy.game_schedule(games, 16, 0, 3) != train_policy.game_schedule(games, 16, 1, 3)


def test_every_turn_gets_its_episodes_advantage(group):
    """Every agent turn of an episode gets its episode's group-normalised advantage (won 1, lost 0), in order."""
    seqs, adv, no_signal = train_policy.turn_batch(group, G)
    won, lost = group[0], group[1:]
    n_won, n_lost = len(won.turns), sum(len(ep.turns) for ep in lost)
    assert no_signal == 0 and len(seqs) == len(adv) == n_won + n_lost
    # rewards 1, 0, 0: mean 1/3, unbiased std 1/sqrt(3) -> A = +2/sqrt(3) for the won episode, -1/sqrt(3) a lost one
    assert adv[:n_won] == pytest.approx([2 / 3**0.5] * n_won, abs=1e-3) and adv[n_won:] == pytest.approx(
        [-1 / 3**0.5] * n_lost, abs=1e-3
    )
    assert seqs[:n_won] == won.seqs and seqs[n_won:] == [s for ep in lost for s in ep.seqs]


def test_a_group_where_every_episode_fails_gives_nothing_to_train(group):
    """A group whose episodes all failed has no signal: no turn to train on, and it is counted."""
    seqs, adv, no_signal = train_policy.turn_batch(group[1:3], 2)
    assert (seqs, adv, no_signal) == ([], [], 1)


def test_one_update_makes_the_won_turns_likelier_and_the_lost_ones_less_likely(tiny, group):
    model = copy.deepcopy(tiny[0])
    seqs, adv, _ = train_policy.turn_batch(group[:2], 2)  # the won episode and one lost: A = +-1/sqrt(2)
    # the winning turn and the lost episode's first (that every turn gets its episode's A: the test above)
    keep = [len(group[0].turns) - 1, len(group[0].turns)]
    seqs, adv, n_won = [seqs[i] for i in keep], [adv[i] for i in keep], 1
    params = add_lora(model, 8)
    args = train_policy.parse_args(["--micro-batch", "4", "--beta", "0"])

    def mean_logp():
        with torch.no_grad():
            per_seq = [completion_logprobs(model, *collate([s], model.device))[0].mean().item() for s in seqs]
        return sum(per_seq[:n_won]) / n_won, sum(per_seq[n_won:]) / (len(seqs) - n_won)

    won_before, lost_before = mean_logp()
    train_policy.grpo_update(model, torch.optim.AdamW(params, lr=1e-3), seqs, adv, args)
    won_after, lost_after = mean_logp()
    assert won_after > won_before and lost_after < lost_before


def test_train_policy_skips_steps_without_signal_checkpoints_and_resumes(tmp_path):
    common = [
        "--games",
        "1",
        "--games-per-step",
        "1",
        "--group-size",
        "2",
        "--max-steps",
        "2",
        "--max-new-tokens",
        "8",
        "--lora-rank",
        "4",
        "--out",
        str(tmp_path),
    ]
    rows = train_policy.main(train_policy.parse_args(common + ["--updates", "1"]))
    assert len(rows) == 1 and rows[0] == dict(
        rows[0], step=1, success=0.0, groups=1, no_signal_groups=1, trained_turns=0, updated=False
    )
    # no update happened: the checkpoint's merged weights are the starting model's
    start, saved = load_model("smollm2-135m")[0], load_model(str(tmp_path / "checkpoint" / "model"))[0]
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), saved.state_dict().values()))
    rows = train_policy.main(train_policy.parse_args(common + ["--updates", "2", "--resume"]))
    assert [r["step"] for r in rows] == [1, 2]
    rollouts = read_jsonl(tmp_path / "rollouts.jsonl", required=("step", "won", "turns"))
    assert [r["step"] for r in rollouts] == [1, 1, 2, 2] and (tmp_path / "metrics.png").exists()
    assert torch.load(tmp_path / "checkpoint" / "trainer.pt", weights_only=False)["step"] == 2


def test_rft_trains_on_every_model_turn_of_the_won_episodes_only(tiny, group):
    won, lost = group[0], group[1:]
    random_turn = copy.copy(won)
    random_turn.seqs = won.seqs[:-1] + [None]  # a turn the random policy played: no tokens of the model's
    assert train_policy.won_turns(group) == won.seqs and train_policy.won_turns(lost) == []
    assert train_policy.won_turns([random_turn]) == won.seqs[:-1]
    # one RFT step on the won episode's last two turns makes them likelier (cross-entropy on the agent's tokens)
    model, seqs = copy.deepcopy(tiny[0]), won.seqs[-2:]
    params = add_lora(model, 8)
    args = train_policy.parse_args(["--method", "rft", "--micro-batch", "4"])
    assert args.lr == train_policy.LR_RFT and args.max_steps == 30 and args.rft_episodes == 3  # B.1's sampling

    def mean_logp():
        with torch.no_grad():
            return sum(completion_logprobs(model, *collate([s], model.device))[0].mean().item() for s in seqs)

    before = mean_logp()
    train_policy.sft_update(model, torch.optim.AdamW(params, lr=1e-3), seqs, args)
    assert mean_logp() > before


def test_rft_samples_once_and_resumes_without_replaying_an_episode(tmp_path):
    common = ["--method", "rft", "--games", "1", "--max-steps", "2", "--max-new-tokens", "8", "--lora-rank", "4"]
    stats = train_policy.main(train_policy.parse_args(common + ["--rft-episodes", "1", "--out", str(tmp_path)]))
    # the tiny model wins nothing: no turn to train on, the start model is saved as RFT's
    assert stats == dict(episodes=1, won_episodes=0, won_turns=0)
    assert (tmp_path / "checkpoint" / "model" / "model.safetensors").exists()
    first = read_jsonl(tmp_path / "rollouts.jsonl")
    # more episodes a game, resumed: only the missing one is played, the first is kept as it was
    stats = train_policy.main(
        train_policy.parse_args(common + ["--rft-episodes", "2", "--out", str(tmp_path), "--resume"])
    )
    rollouts = read_jsonl(tmp_path / "rollouts.jsonl")
    assert stats["episodes"] == 2 and [r["episode"] for r in rollouts] == [0, 1] and rollouts[0] == first[0]
    assert json.loads((tmp_path / "rft.json").read_text())["episodes"] == 2


def make_commands(*args):
    """The stage commands `make args` runs, in order, each as its argv (run with a PYTHON that prints them)."""
    show = f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"
    r = subprocess.run(
        ["make", "-s", "-o", "install", *args, f"PYTHON={show}"], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_the_pipeline_runs_end_to_end_and_prints_table_1(tmp_path):
    """`make pipeline`'s CPU experiment at the least budget, one seed, its commands run in order in this process
    (conftest.run_script: the 13 stages' imports once, not ~10 s each): both arms start from the one warm-up
    checkpoint and make equal updates on the same triplets; forgetting, Table 1 and the report follow. (The seed
    loop: the test below; the report's mean ± std over seeds: tests/test_evaluate.py.)"""
    general = read_jsonl(ROOT / "data" / "general_prompts.jsonl")
    prompts = tmp_path / "general_prompts.jsonl"  # forgetting on one prompt of each kind, not all 100
    prompts.write_text("".join(json.dumps(p) + "\n" for p in {p["kind"]: p for p in general}.values()))
    budget = dict(  # held-out and warm-up games 5-7: train games 2-4 take ~5 s to start (games 0, 1, 5-7: 1-2 s)
        SEEDS="0",
        GAMES="--games 1 --max-steps 3",
        HELDOUT="--first-game 5 --games 2 --max-steps 2",
        WARMUP_GAMES="--first-game 7 --games 1 --max-steps 3",
        WARMUP="--batch-size 2 --max-steps 1",
        PI_GAMES="--first-game 1 --games 1 --max-steps 2",
        PI="--batch-size 2 --max-steps 1",
        FILTER="--filter-k 2 --max-new-tokens 8",
        ARM="--batch-size 1 --max-steps 1 --eval-every 1",
        RWML="--group-size 2 --lr 1e-5",
        SFT="--lr 2e-5",
        WM_FLAGS=f"--max-new-tokens 8 --micro-batch 4 --val-size 3 --heldout {tmp_path}/heldout/triplets.jsonl",
        POLICY="--lora-rank 4 --games 1 --games-per-step 1 --group-size 2 --updates 1 --max-steps 1 --max-new-tokens 8",
        RFT="--lora-rank 4 --games 1 --rft-episodes 1 --max-steps 1 --max-new-tokens 8",
        EVAL="--games 1 --runs 1 --max-steps 1 --max-new-tokens 8 --splits valid_seen",  # both splits: test_evaluate
        FORGETTING=f"--prompts {prompts}",
    )
    for argv in make_commands("pipeline", f"OUT={tmp_path}", *(f"{k}={v}" for k, v in budget.items())):
        r = run_script(*argv)
        assert r.returncode == 0, " ".join(argv) + "\n" + r.stderr[-2000:]
    start = str(tmp_path / "warmup" / "checkpoint" / "model")
    arms = {f"{a}_s0": tmp_path / "arms" / f"{a}_s0" for a in ("rwml", "wm_sft")}
    saved = {name: torch.load(f / "checkpoint" / "trainer.pt", weights_only=False) for name, f in arms.items()}
    assert {x["args"]["model"] for x in saved.values()} == {start}  # one warm-up checkpoint for every arm
    assert {x["args"]["triplets"] for x in saved.values()} == {str(tmp_path / "filter" / "triplets.filtered.jsonl")}
    assert {(x["step"], x["args"]["batch_size"]) for x in saved.values()} == {(1, 1)}
    assert saved["wm_sft_s0"]["args"]["lr"] == 2 * saved["rwml_s0"]["args"]["lr"]  # the paper's ratio (B.1)
    assert {x["args"]["seed"] for x in saved.values()} == {0}
    finals = {
        name: [row for row in read_jsonl(f / "metrics.jsonl") if "heldout/reward" in row] for name, f in arms.items()
    }
    assert all([row["step"] for row in rows] == [1] for rows in finals.values())  # no start evaluation: the warm-up's
    report = (tmp_path / "report.md").read_text()
    for arm, name in (("rwml", "RWML"), ("wm_sft", "WM SFT (continued)")):
        final = finals[f"{arm}_s0"][-1]
        assert f"| {name} | 1 | 1 | {final['heldout/reward']:.3f} | {final['heldout/similarity']:.3f} | " in report
    forgetting = json.loads((tmp_path / "forgetting" / "forgetting.json").read_text())
    names = sorted(m["name"] for m in forgetting["models"])
    assert forgetting["start"] == start and names == sorted(arms)
    filt = read_jsonl(tmp_path / "filter" / "metrics.jsonl")[0]  # the filter's model is pi', trained on its own games
    assert (
        filt["model"] == str(tmp_path / "pi_prime" / "checkpoint" / "model") and f"scored by {filt['model']}" in report
    )
    pi = read_jsonl(tmp_path / "pi_prime" / "metrics.jsonl")
    assert pi[-1]["heldout/triplets"] == 3 and "| π′ (the filter's model) | 1 | 2 |" in report
    # pi''s step 0 is the warm-up checkpoint in WM SFT's prompt: the WM SFT arm's start in the report
    assert pi[0]["step"] == 0 and "heldout/reward" in pi[0]
    assert (
        f"| warm-up checkpoint (WM SFT's prompt: WM SFT's step 0) | – | 0 | {pi[0]['heldout/reward']:.3f} |" in report
    )
    assert all(0 <= m["weights_changed"] <= 1 and m["kl"] >= 0 for m in forgetting["models"])
    assert "| format warm-up | 1 | 3 |" in report and "| held-out, scored | 2 | 3 |" in report  # games, triplets
    rows = (tmp_path / "eval" / "table.md").read_text().splitlines()
    assert rows[0] == "| Method | ID (valid_seen) |"
    assert [row.split(" | ")[0] for row in rows[2:9]] == [  # the paper's Table 1, in its order
        "| Base",
        "| RFT",
        "| Policy RL",
        "| WM SFT",
        "| RWML",
        "| WM SFT + Policy RL",
        "| RWML + Policy RL",
    ]
    assert json.loads((tmp_path / "rft" / "rft.json").read_text())["episodes"] == 1
    assert rows[0] in report and "report.md" in r.stdout and (tmp_path / "report.png").exists()
    for stage in ("collect", "heldout", "warmup", "pi_prime", "arms/rwml_s0", "arms/wm_sft_s0", "policy_rl"):
        assert (tmp_path / stage / "metrics.png").exists(), stage


def test_the_experiment_trains_both_arms_once_per_seed_from_the_warm_up_checkpoint():
    """The Makefile's seed loops, every command printed instead of run: each seed trains RWML and WM SFT (twice
    RWML's rate) from the warm-up checkpoint on the filtered triplets with the same flags; `make ablations` trains
    Table 4's three arms with the same flags; forgetting compares every arm."""
    commands = [c for target in ("pipeline", "ablations") for c in make_commands(target, "OUT=out", "SEEDS=0 1 2")]
    arms = [argv for argv in commands if argv[0] == "train_wm.py" and "out/arms/" in " ".join(argv)]
    flag = lambda argv, name: argv[argv.index(name) + 1]
    table4 = ("rwml_no_filter", "rwml_judge", "rwml_judge_binary")
    assert [(flag(a, "--seed"), flag(a, "--out").rpartition("/")[2]) for a in arms] == [
        (s, f"{arm}_s{s}") for arms_ in (("rwml", "wm_sft"), table4) for s in "012" for arm in arms_
    ]
    assert [flag(a, "--mode") for a in arms[:2]] == ["rwml", "sft"] and float(flag(arms[1], "--lr")) == 2 * float(
        flag(arms[0], "--lr")
    )
    own = {"--mode", "--seed", "--out", "--group-size", "--triplets", "--lr", "--reward", "--judge-max-new-tokens"}
    shared = [[x for i, x in enumerate(a) if x not in own and (i == 0 or a[i - 1] not in own)] for a in arms]
    assert all(s == shared[0] for s in shared) and flag(shared[0], "--model") == "out/warmup/checkpoint/model"
    assert [flag(a, "--triplets") for a in arms[:2] + arms[6:9]] == ["out/filter/triplets.filtered.jsonl"] * 2 + [
        "out/collect/triplets.jsonl",  # Table 4's "w/o subsample": all the training triplets
        "out/filter/triplets.filtered.jsonl",
        "out/filter/triplets.filtered.jsonl",
    ]
    pi, filt = (next(a for a in commands if flag(a, "--out") == f"out/{s}") for s in ("pi_prime", "filter"))
    assert (flag(pi, "--model"), flag(pi, "--triplets")) == (
        "out/warmup/checkpoint/model",
        "out/pi_data/triplets.jsonl",
    )
    assert flag(filt, "--model") == "out/pi_prime/checkpoint/model"
    forgetting = [argv for argv in commands if argv[:2] == ["evaluate.py", "--forgetting"]]
    assert {flag(f, "--forgetting") for f in forgetting} == {"out/warmup/checkpoint/model"}
    names = [f[f.index("--model") + 1 :] for f in forgetting]
    assert [sorted(n) for n in names] == [
        sorted(f"{arm}_s{s}=out/arms/{arm}_s{s}/checkpoint/model" for arm in arms_ for s in "012")
        for arms_ in (("rwml", "wm_sft"), table4)
    ]


def test_the_experiment_runs_in_fp32_on_any_device():
    """Every model of the CPU experiment (`make pipeline` and `make ablations`) loads in fp32 on a GPU too, where
    --dtype auto is bf16; forgetting measures in fp32 by itself."""
    commands = make_commands("pipeline", "OUT=out") + make_commands("ablations", "OUT=out")
    models = [a for a in commands if a[0] in ("train_wm.py", "train_policy.py", "evaluate.py") and "--model" in a]
    fp32 = lambda a: "--dtype" in a and a[a.index("--dtype") + 1] == "fp32"
    # pipeline: warm-up, pi', filter, 2 arms x 4 seeds, forgetting, RFT, 3 Policy RL, Table 1; ablations: 3 x 4,
    # forgetting
    assert len(models) == 17 + 13 and all(fp32(a) or "--forgetting" in a for a in models)
