"""Bad input as a new user would type it: each case is one `error:` line, no traceback, before any model is
loaded; non-finite numbers never reach the weights, a checkpoint or a JSONL file. The scripts run in this process
(conftest.run_script); tests/test_collect.py checks the same in real processes."""

import argparse
import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_script
from grpo import grpo_update
from support.checks import MAX_SKIPPED_IN_A_ROW, SkipCounter, claim_out, json_line
from support.lm import chat_prompt, sample
from support.lora import add_lora
from support.runs import read_jsonl
from support.training import save_checkpoint

TRIPLET = dict(
    id="g#0#0",
    task="put a mug in the sink",
    history=[],
    state="You are in the kitchen.",
    action="go to sink 1",
    next_state="You arrive at sink 1. On the sink 1, you see nothing.",
)


@pytest.fixture(scope="module")
def triplets(tmp_path_factory):
    """12 well-formed triplets of 12 games (the checks below fail before anything reads their text)."""
    path = tmp_path_factory.mktemp("cli") / "triplets.jsonl"
    path.write_text("".join(json.dumps(dict(TRIPLET, id=f"g{i}#0#0")) + "\n" for i in range(12)))
    return path


def assert_one_error_line(r, rc, message, alone=True):
    """Exit status rc, and stderr is the one error line (alone=False: after the progress bars of a run)."""
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == rc and lines[-1].startswith("error: ") and message in lines[-1], r.stderr[-3000:]
    assert len(lines) == 1 if alone else sum("error" in line for line in lines) == 1, r.stderr[-3000:]


# (script, argv, exit status, the message); T: the triplets file, O: a fresh output folder
BAD_ARGUMENTS = [
    (
        "train_wm.py",
        ["--triplets", "T", "--out", "O", "--group-size", "1"],
        2,
        "--group-size must be ≥ 2 (GRPO normalises within a group), got 1",
    ),
    ("train_wm.py", ["--triplets", "T", "--out", "O", "--group-size", "0"], 2, "--group-size must be ≥ 2"),
    ("train_wm.py", ["--triplets", "T", "--out", "O", "--batch-size", "0"], 2, "--batch-size must be ≥ 1, got 0"),
    ("train_wm.py", ["--triplets", "T", "--out", "O", "--lora-rank", "-1"], 2, "--lora-rank must be ≥ 0"),
    ("train_wm.py", ["--triplets", "T", "--out", "O", "--lr", "0"], 2, "--lr must be > 0, got 0"),
    ("train_wm.py", ["--triplets", "T", "--out", "O", "--lr", "nan"], 2, "--lr must be > 0, got nan"),
    ("train_wm.py", ["--triplets", "T", "--out", "O", "--lr", "fast"], 2, "--lr must be a number, got 'fast'"),
    ("train_wm.py", ["--triplets", "T", "--out", "O", "--tau", "0"], 2, "--tau must be in (0, 2]"),
    (
        "train_wm.py",
        ["--triplets", "T", "--out", "O", "--keep-easy", "1.1"],
        2,
        "--keep-easy must be in [0, 1], got 1.1",
    ),
    (
        "train_wm.py",
        ["--triplets", "T", "--out", "O", "--temperature", "-1"],
        2,
        "--temperature must be ≥ 0 (0 is greedy)",
    ),
    ("train_wm.py", ["--triplets", "T", "--out", "O", "--max-steps", "0"], 2, "--max-steps must be ≥ 1"),
    ("train_wm.py", ["--triplets", "T", "--out", "O", "--val-frac", "1"], 2, "--val-frac must be in (0, 1)"),
    (
        "train_wm.py",
        ["--triplets", "T", "--out", "O", "--val-size", "2"],
        1,
        "--val-size 2: --val-frac 0.1 holds out 1 of the 12 triplets; ask for at most 1",
    ),
    (
        "train_wm.py",
        ["--triplets", "T", "--out", "O", "--val-frac", "0.99"],
        1,
        "--val-frac 0.99 holds out all 12 games of",
    ),
    (
        "train_wm.py",
        ["--triplets", "T", "--out", "O", "--model", "/no/such/folder"],
        1,
        "model folder /no/such/folder does not exist",
    ),
    (
        "train_wm.py",
        ["--triplets", "T", "--out", "O", "--model", "no-such-org/no-such-model", "--dry-run"],
        1,
        "model 'no-such-org/no-such-model' (not a local folder, and the Hugging Face Hub could not give it)",
    ),
    ("train_wm.py", ["--triplets", "O/missing.jsonl", "--out", "O"], 1, "missing.jsonl does not exist"),
    ("train_policy.py", ["--games", "0", "--updates", "1", "--out", "O"], 2, "--games must be ≥ 1, got 0"),
    ("train_policy.py", ["--updates", "0", "--out", "O"], 2, "--updates must be ≥ 1"),
    ("train_policy.py", ["--group-size", "1", "--out", "O"], 2, "--group-size must be ≥ 2"),
    ("collect.py", ["--model", "/no/such/folder", "--out", "O"], 1, "model folder /no/such/folder does not exist"),
    ("collect.py", ["--epsilon", "1.5", "--out", "O"], 2, "--epsilon must be in [0, 1], got 1.5"),
    ("collect.py", ["--episodes", "0", "--out", "O"], 2, "--episodes must be ≥ 1"),
    ("collect.py", ["--env", "nope", "--out", "O"], 2, "argument --env: invalid choice: 'nope'"),
    ("collect.py", ["--policy", "random", "--split", "nope", "--out", "O"], 1, "unknown ALFWorld split 'nope'"),
    ("collect.py", ["--env", "tau2", "--domain", "nope", "--out", "O"], 1, "unknown τ²-bench domain 'nope'"),
    (
        "collect.py",
        ["--env", "tau2", "--policy", "random", "--out", "O"],
        2,
        "--policy random needs ALFWorld's admissible",
    ),
    ("evaluate.py", ["--runs", "0", "--out", "O"], 2, "--runs must be ≥ 1"),
    (
        "evaluate.py",
        ["--model", "Mine=runs/no/checkpoint/model", "--out", "O"],
        1,
        "model folder runs/no/checkpoint/model does not exist",
    ),
    ("evaluate.py", ["--wm", "T", "--val-size", "13", "--out", "O"], 1, "--val-size 13: "),
    ("train_wm.py", ["--triplets", "T", "--heldout", "T", "--out", "O"], 1, "12 games of --heldout"),
    (
        "train_wm.py",
        ["--triplets", "T", "--heldout", "O/missing.jsonl", "--out", "O"],
        1,
        "missing.jsonl does not exist",
    ),
    ("collect.py", ["--policy", "random", "--first-game", "200", "--out", "O"], 1, "--first-game 200: the train split"),
    ("collect.py", ["--invalid-rate", "0.5", "--out", "O"], 2, "--invalid-rate is a share of the random policy's"),
    ("collect.py", ["--policy", "random", "--invalid-rate", "2", "--out", "O"], 2, "--invalid-rate must be in [0, 1]"),
    (
        "evaluate.py",
        ["--forgetting", "/no/such/start", "--model", "smollm2-135m", "--out", "O"],
        1,
        "model folder /no/such/start does not exist",
    ),
    (  # full fine-tuning in bf16 (--dtype auto on CUDA): refused before the model loads
        "train_wm.py",
        ["--mode", "sft", "--triplets", "T", "--dtype", "bf16", "--lr", "1e-6", "--out", "O"],
        1,
        "full fine-tuning with bf16 weights (--dtype bf16) rounds its updates away: pass --dtype fp32 (fp32 weights), "
        "or --lora-rank R",
    ),
    ("train_policy.py", ["--dtype", "bf16", "--lr", "1e-6", "--out", "O"], 1, "pass --dtype fp32 (fp32 weights), or"),
]


@pytest.mark.parametrize("script, argv, rc, message", BAD_ARGUMENTS, ids=[" ".join(c[1][-2:]) for c in BAD_ARGUMENTS])
def test_a_bad_argument_is_one_error_line(script, argv, rc, message, triplets, tmp_path):
    argv = [
        str(triplets) if a == "T" else a.replace("O", str(tmp_path / "out"), 1) if a.startswith("O") else a
        for a in argv
    ]
    assert_one_error_line(run_script(script, *argv), rc, message)


def test_group_size_is_checked_where_it_is_used():
    from train_wm import parse_args

    assert parse_args(["--triplets", "t.jsonl", "--mode", "sft", "--group-size", "1"]).group_size == 1  # no groups
    assert parse_args(["--triplets", "t.jsonl", "--mode", "filter", "--group-size", "1"]).mode == "filter"


def test_missing_alfworld_data_is_one_error_line(tmp_path):
    r = run_script("collect.py", "--policy", "random", "--out", tmp_path / "out", env={"ALFWORLD_DATA": "/nonexistent"})
    assert_one_error_line(r, 1, "ALFWorld data not found: /nonexistent")


def lines(*rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


GOOD = dict(TRIPLET, id="g#0#1")
BAD_TRIPLETS = [  # file bytes -> the error (support/schema.py: TRIPLET); each case trained silently or crashed once
    (b"", "holds no triplets"),
    (lines(TRIPLET) + b'{"id": "b",\n', "t.jsonl:2: malformed JSON line"),
    (
        lines(TRIPLET, {k: v for k, v in GOOD.items() if k != "next_state"}),
        "t.jsonl:2: missing field 'next_state'",
    ),
    (lines(TRIPLET) + lines(GOOD).replace(b"sink", b"s\xe9nk"), "t.jsonl:2: not UTF-8 (byte 0xe9 at column"),
    (lines(TRIPLET, dict(GOOD, next_state="")), 't.jsonl:2: `next_state` must be non-empty text, got ""'),
    (lines(TRIPLET, dict(GOOD, next_state=" \n")), "t.jsonl:2: `next_state` must be non-empty text"),
    (lines(TRIPLET, dict(GOOD, state=123)), "t.jsonl:2: `state` must be non-empty text, got 123"),
    (lines(TRIPLET, dict(GOOD, action=None)), "t.jsonl:2: `action` must be a string, got null"),
    (lines(TRIPLET, dict(GOOD, history="none")), "t.jsonl:2: `history` must be a list of [observation, action]"),
    (lines(TRIPLET, dict(GOOD, history=[["a"]])), "t.jsonl:2: `history` must be a list of [observation, action]"),
    (lines(TRIPLET, dict(GOOD, valid="yes")), 't.jsonl:2: `valid` must be true or false, got "yes"'),
    (lines(TRIPLET, GOOD) * 2, "t.jsonl:3: id 'g#0#0' is already on line 1 (each triplet once in a file"),
    (  # collect.py's other file, passed by mistake
        lines(
            dict(env="alfworld", game="g", split="train", task_type="pick", task="t", episode=0, won=False, steps=1)
            | dict(invalid=0, turns=[dict(action="look", valid=True)], policy="random", epsilon=0.0, model=None, seed=0)
        ),
        "t.jsonl:1: a rollout (one episode), not a triplet: pass the triplets.jsonl written beside rollouts.jsonl",
    ),
]


@pytest.mark.parametrize("content, message", BAD_TRIPLETS, ids=[m.split(": ")[-1][:30] for _, m in BAD_TRIPLETS])
def test_bad_triplet_files_name_the_line(content, message, tmp_path):
    (tmp_path / "t.jsonl").write_bytes(content)
    assert_one_error_line(
        run_script("train_wm.py", "--triplets", tmp_path / "t.jsonl", "--out", tmp_path / "out"), 1, message
    )


# every other reader of the records checks them with the same schemas, before a model or embedder loads
BAD_RECORDS = [  # (file to write, its bytes, the script's argv with F for the file, O for a fresh folder, the error)
    ("t.jsonl", lines(TRIPLET, dict(GOOD, next_state="")), ["evaluate.py", "--wm", "F", "--out", "O"], "`next_state`"),
    ("t.jsonl", lines(TRIPLET, dict(GOOD, state=123)), ["evaluate.py", "--calibrate", "F"], "`state` must be"),
    ("p.jsonl", lines(dict(output=1, next_state="s")), ["evaluate.py", "--score", "F"], "`output` must be a string"),
    (
        "p.jsonl",
        lines(dict(prompt="Say hi.", answer="")),
        ["evaluate.py", "--forgetting", "smollm2-135m", "--prompts", "F", "--out", "O"],
        "p.jsonl:1: `answer` must be non-empty text",
    ),
    (
        "O/rollouts.jsonl",
        lines(dict(env="alfworld", game="g", episode="0")),
        ["collect.py", "--policy", "random", "--out", "O", "--resume"],
        "rollouts.jsonl:1: missing field 'split'",
    ),
    (
        "O/warmup/metrics.jsonl",
        lines(dict(step=1, **{"heldout/reward": "0.3"})),
        ["evaluate.py", "--report", "O"],
        'metrics.jsonl:1: `heldout/reward` must be a number or null, got "0.3"',
    ),
]


@pytest.mark.parametrize("name, content, argv, message", BAD_RECORDS, ids=[c[2][1] for c in BAD_RECORDS])
def test_every_reader_checks_the_records_it_reads(name, content, argv, message, tmp_path):
    path = tmp_path / name.replace("O", "out")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    argv = [str(path) if a == "F" else str(tmp_path / "out") if a == "O" else a for a in argv]
    assert_one_error_line(run_script(*argv), 1, message)


def test_a_run_whose_checkpoints_do_not_fit_the_disk_stops_before_loading(triplets, tmp_path):
    """A model folder without weights, whose config asks for ~2 TB of fp32 weights: the disk check stops the run
    after the memory plan (arithmetic on the config), before any weight is read."""
    from support.lm import resolve_model

    src, big = Path(resolve_model("smollm2-135m")), tmp_path / "big"
    big.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, big / f.name)
    config = json.loads((src / "config.json").read_text())
    (big / "config.json").write_text(json.dumps(dict(config, intermediate_size=10_000_000)))
    r = run_script("train_wm.py", "--triplets", triplets, "--out", tmp_path / "out", "--model", big, "--dtype", "fp32")
    assert_one_error_line(r, 1, "GB free on its disk, and this run writes up to", alone=False)
    assert "two checkpoints during a save, each 2" in r.stderr and "memory plan" in r.stdout


def test_out_must_be_a_folder_of_this_stage(triplets, tmp_path):
    (tmp_path / "file").write_text("")
    assert_one_error_line(
        run_script("train_wm.py", "--triplets", triplets, "--out", tmp_path / "file"),
        1,
        f"--out {tmp_path / 'file'} is a file, not a folder",
    )
    claim_out(tmp_path / "collected", "collect")  # what collect.py marks its --out with
    for extra in ([], ["--resume"]):  # with or without --resume: the records of two stages never mix
        r = run_script("train_wm.py", "--triplets", triplets, "--out", tmp_path / "collected", *extra)
        assert_one_error_line(r, 1, "holds a `collect` run: give this `train_wm --mode rwml` run its own folder")
    assert sorted(os.listdir(tmp_path / "collected")) == ["run.json"]
    claim_out(tmp_path / "collected", "collect")  # the same stage again: fine


def test_a_lost_run_stops_after_non_finite_updates_and_keeps_finite_checkpoints(triplets, tmp_path):
    """lr 1e30: the first AdamW step moves the LoRA weights by ~1e30, every later loss is NaN."""
    r = run_script(
        "train_wm.py",
        "--mode",
        "sft",
        "--triplets",
        triplets,
        "--out",
        tmp_path,
        "--lr",
        "1e30",
        "--lora-rank",
        "4",
        "--batch-size",
        "2",
        "--max-steps",
        "8",
        "--save-every",
        "2",
        "--eval-every",
        "100",
        "--no-start-eval",
        "--max-new-tokens",
        "4",
    )
    last = 1 + MAX_SKIPPED_IN_A_ROW
    assert_one_error_line(
        r,
        1,
        f"step {last}: the loss or gradient norm was not finite in {MAX_SKIPPED_IN_A_ROW} updates in a row",
        alone=False,
    )
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    rows = [json.loads(line) for line in text.splitlines()]  # strict JSON
    assert [r["skipped_updates"] for r in rows] == [0, *range(1, MAX_SKIPPED_IN_A_ROW + 1)]
    assert rows[-1]["train/loss"] is None and rows[0]["train/loss"] > 0
    state = torch.load(tmp_path / "checkpoint" / "trainer.pt", weights_only=False)
    assert state["step"] == 2 * ((last - 1) // 2)  # the last save before the stop, of the unchanged (finite) weights
    assert all(torch.isfinite(v).all() for v in state["adapters"].values())


def test_grpo_update_skips_a_non_finite_step(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    params = add_lora(model, 4)
    seqs = [(p, c) for p, c, _ in sample(model, tok, [chat_prompt(tok, "Name a colour.")] * 2, 6, temperature=1.0)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    args = dict(micro_batch=2, ppo_epochs=2, clip_eps=0.2, beta=0.0, max_grad_norm=1.0, token_mean=True)
    before = [p.detach().clone() for p in params]
    stats = grpo_update(model, opt, seqs, [float("nan"), 1.0], argparse.Namespace(**args))
    assert stats["skipped"] == 2 and all(torch.equal(a, b) for a, b in zip(before, params))  # both epochs skipped
    assert not opt.state and all(p.grad is None for p in params)  # no AdamW moment was touched
    stats = grpo_update(model, opt, seqs, [-1.0, 1.0], argparse.Namespace(**args))
    assert stats["skipped"] == 0 and not all(torch.equal(a, b) for a, b in zip(before, params))


def test_no_checkpoint_from_non_finite_weights(tiny, tmp_path):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():  # finite, though their sum is not: saved
        model.model.layers[0].mlp.up_proj.weight[0, :2] = 3e38
    save_checkpoint(tmp_path / "ckpt", model, tok, opt, 1, argparse.Namespace(seed=0))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(SystemExit, match=r"error: step 2: weight model.layers.0.mlp.up_proj.weight is not finite"):
        save_checkpoint(tmp_path / "ckpt", model, tok, opt, 2, argparse.Namespace(seed=0))
    assert torch.load(tmp_path / "ckpt" / "trainer.pt", weights_only=False)["step"] == 1  # the previous one is kept


def test_skip_counter_and_json_lines(tmp_path):
    skips = SkipCounter()
    for step, skipped in enumerate([True, True, False] + [True] * (MAX_SKIPPED_IN_A_ROW - 1), 1):
        skips.update(skipped)
        skips.check(step)
    assert skips.total == MAX_SKIPPED_IN_A_ROW + 1
    skips.update(True)
    with pytest.raises(SystemExit, match=f"error: step 9: .* in {MAX_SKIPPED_IN_A_ROW} updates in a row"):
        skips.check(9)
    line = json_line(dict(a=float("nan"), b=[float("inf"), 1.5], c=dict(d=-float("inf")), e="NaN"))
    assert json.loads(line) == dict(a=None, b=[None, 1.5], c=dict(d=None), e="NaN")
    (tmp_path / "m.jsonl").write_text(line)
    assert read_jsonl(tmp_path / "m.jsonl") == [dict(a=None, b=[None, 1.5], c=dict(d=None), e="NaN")]
