"""World-model learning end to end on real ALFWorld triplets with the real tiny model."""

import copy
import json
import random
import subprocess
import sys

import pytest
import torch

import grpo
import train_wm
from conftest import ROOT
from reward import wm_prompt
from support import triplets as wm_data
from support.lm import chat_prompt
from support.runs import read_jsonl
from support.schema import TRIPLET


def wm_args(triplets, out, *extra):
    return train_wm.parse_args(
        [
            "--triplets",
            str(triplets),
            "--out",
            str(out),
            "--batch-size",
            "1",
            "--group-size",
            "2",
            "--max-new-tokens",
            "12",
            "--eval-every",
            "1",
            "--lora-rank",
            "4",
            "--lr",
            "1e-4",
            *extra,
        ]
    )


def test_sft_target_is_an_empty_thought_then_the_real_next_state(tiny):
    """WM SFT's target is the answer Qwen3's own chat template writes for a turn without reasoning (the empty
    thought its thinking-off prompt pre-fills), then the real next state in its tags, then the end token."""
    tok = copy.deepcopy(tiny[1])
    config = ROOT / "tests" / "data" / "chat_templates" / "qwen3-8b.tokenizer_config.json"
    tok.chat_template = json.loads(config.read_text())["chat_template"]
    turn = [dict(role="user", content="hi")]
    on, off = (
        tok.apply_chat_template(turn, tokenize=False, add_generation_prompt=True, enable_thinking=t)
        for t in (True, False)
    )
    empty_thought = off[len(on) :]  # what thinking off adds to the prompt: the template's answer without reasoning
    ids = train_wm.sft_target(tok, dict(next_state="You arrive at sink 1."))
    assert ids[-1] == tok.eos_token_id and "<think>" in empty_thought
    assert tok.decode(ids[:-1]) == empty_thought + "<next_state>You arrive at sink 1.</next_state>"
    assert tok(tok.decode(ids[:-1]), add_special_tokens=False)["input_ids"] == ids[:-1]  # no special token before


def test_the_token_budget_fits_the_longest_next_state_and_cut_predictions_are_counted(tiny, triplets):
    from reward import Embeddings, mean_scores

    model, tok = tiny
    every = read_jsonl(triplets)
    tagged = [tok(f"<next_state>{t['next_state']}</next_state>", add_special_tokens=False)["input_ids"] for t in every]
    assert wm_data.wm_budget(tok, every) == max(map(len, tagged)) + wm_data.THINK_TOKENS
    _, recs = train_wm.predict_and_score(model, tok, every[:2], Embeddings(), 0.2, 3, 2)
    assert [r["truncated"] for r in recs] == [True, True] and mean_scores(recs)["truncated"] == 1.0


def test_sft_lowers_the_loss_on_its_batch(tiny, triplets):
    """Three WM SFT steps on the same batch lower its cross-entropy each time."""
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    args = wm_args(triplets, "/unused")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seqs = [
        (tok(chat_prompt(tok, wm_prompt(t)), add_special_tokens=False)["input_ids"], train_wm.sft_target(tok, t))
        for t in read_jsonl(triplets)[:2]
    ]
    losses = [grpo.sft_update(model, opt, seqs, args)["loss"] for _ in range(3)]
    assert losses[2] < losses[1] < losses[0]


def test_rwml_runs_checkpoints_and_resumes_without_duplicate_steps(triplets, tmp_path):
    budget = ["--val-size", "2", "--max-new-tokens", "4"]  # 3 evaluations and 2 updates: each writes 4 tokens
    rows = train_wm.main(wm_args(triplets, tmp_path, "--max-steps", "1", "--save-every", "1", *budget))
    assert [r["step"] for r in rows] == [0, 1]
    for k in (
        "train/reward",
        "train/similarity",
        "train/kl",
        "train/clipfrac",
        "train/entropy",
        "train/no_signal_groups",
        "train/completion_len",
        "heldout/reward",
        "heldout/similarity",
        "seconds",
    ):
        assert k in rows[1], k
    assert (tmp_path / "metrics.png").exists() and (tmp_path / "checkpoint" / "model" / "config.json").exists()
    held, every = read_jsonl(tmp_path / "heldout.jsonl"), read_jsonl(triplets)
    assert {t["game"] for t in held} == {every[-1]["game"]} and held == [t for t in every if t in held]  # 1 of 2 games
    rows = train_wm.main(wm_args(triplets, tmp_path, "--max-steps", "2", "--resume", *budget))
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert torch.load(tmp_path / "checkpoint" / "trainer.pt", weights_only=False)["step"] == 2


def test_filter_keeps_hard_triplets_and_a_tenth_of_easy_ones(triplets, tmp_path):
    """The filter's rule: a triplet is easy when the mean reward of pi''s K predictions exceeds tau_easy; every
    hard triplet is kept, an easy one with probability keep_easy (one draw of random.Random(seed) per easy
    triplet, in order)."""
    every = read_jsonl(triplets)  # 2 games of 5 triplets: the filter holds one game out before it scores
    few = tmp_path / "few.jsonl"  # the base tiny model writes no <next_state>: every reward 0, nothing easy, all kept
    few.write_text("".join(json.dumps(t) + "\n" for t in every if int(t["id"].rsplit("#", 1)[1]) < 3))
    stats = train_wm.main(wm_args(few, tmp_path / "none", "--mode", "filter", "--filter-k", "2"))
    assert stats == dict(stats, triplets=3, easy_fraction=0.0, kept=3, filter_tau=0.1, tau_easy=0.0)  # Table A2
    # the rule on pi''s scores written by hand (a resumed run scores nothing again): the mean reward of the K
    # predictions; easy when it exceeds tau_easy (0.0: one prediction of K within tau_d), kept with p keep_easy,
    # one draw of the run's random.Random(seed) per easy triplet, in order
    train = [t for t in every if t["game"] == every[0]["game"]]
    mean_rewards = [0.0, 0.5, 1.0, 0.0, 0.5]
    for name, tau_easy, keep_easy in [("all", 0.0, 0.8), ("half", 0.5, 0.1)]:
        (tmp_path / name).mkdir()
        scored = [dict(t, filter_reward=r) for t, r in zip(train, mean_rewards)]
        (tmp_path / name / "scored.jsonl").write_text("".join(json.dumps(t) + "\n" for t in scored))
        argv = ["--mode", "filter", "--filter-k", "2", "--tau-easy", str(tau_easy), "--keep-easy", str(keep_easy)]
        stats = train_wm.main(wm_args(triplets, tmp_path / name, *argv, "--resume"))
        easy = [r > tau_easy for r in mean_rewards]
        rng = random.Random(0)  # the run's --seed 0
        expect = [t["id"] for t, e in zip(train, easy) if not e or rng.random() < keep_easy]
        kept = read_jsonl(tmp_path / name / "triplets.filtered.jsonl", TRIPLET, required=("filter_reward",))
        assert [t["id"] for t in kept] == expect and stats["easy_fraction"] == sum(easy) / 5
    assert stats["easy_fraction"] == 1 / 5 and len(kept) == 4  # 0.5 is not above 0.5; the 1.0 not drawn (p 0.1)
    held = read_jsonl(tmp_path / "all" / "heldout.jsonl")
    assert len(kept) == stats["kept"] and len(held) == 5 and not {t["game"] for t in held} & {t["game"] for t in kept}


def test_the_heldout_split_is_by_game_so_no_game_is_on_both_sides():
    """3 episodes of a game start from the same reset: their first triplets are identical, and must not sit on
    both sides. Games from the `game` field, else from the id's "game#episode#turn"."""
    triplets = [
        dict(id=f"g{g}#{e}#{t}", **({"game": f"g{g}"} if g % 2 else {}), next_state=f"{g}.{t}")
        for g in range(30)
        for e in range(3)
        for t in range(4)
    ]
    for seed in range(5):
        train, held = wm_data.heldout_split(triplets, 0.1, seed)
        games = lambda ts: {t["id"].split("#")[0] for t in ts}
        assert len(games(held)) == 3 and not games(train) & games(held) and len(train) + len(held) == len(triplets)
        assert not {t["next_state"] for t in train} & {t["next_state"] for t in held}
    assert wm_data.game_of(dict(id="retail/5#0#2", game="retail/5")) == wm_data.game_of(dict(id="retail/5#1#0"))


def test_a_malformed_triplets_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text(
        '{"id": "a", "task": "t", "history": [], "state": "s", "action": "a", "next_state": "n"}\n{"id": "b",\n'
    )
    r = subprocess.run(
        [sys.executable, str(ROOT / "train_wm.py"), "--triplets", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert (
        r.returncode == 1
        and r.stderr.strip()
        == f"error: {bad}:2: malformed JSON line (Expecting property name enclosed in double quotes)"
    )


def test_heldout_scores_split_valid_and_invalid_actions():
    triplets = [dict(valid=True), dict(valid=False), dict(valid=False)]
    records = [
        dict(reward=1.0, similarity=0.9, format=True, exact=True),
        dict(reward=0.0, similarity=0.1, format=True, exact=False),
        dict(reward=1.0, similarity=0.95, format=True, exact=False),
    ]
    s = train_wm.heldout_scores(triplets, records)
    assert s["reward"] == pytest.approx(2 / 3) and s["exact"] == pytest.approx(1 / 3)
    assert s["valid/reward"] == 1.0 and s["valid/exact"] == 1.0
    assert s["invalid/reward"] == 0.5 and s["invalid/similarity"] == pytest.approx(0.525) and s["invalid/exact"] == 0
    assert s["triplets"] == 3 and s["valid/triplets"] == 1 and s["invalid/triplets"] == 2
    assert set(train_wm.heldout_scores([{}] * 3, records)) == {"reward", "similarity", "format", "exact", "triplets"}


def test_the_filter_chain_scores_with_pi_prime_trained_on_its_own_share_of_games(triplets, tmp_path, capsys):
    """Sec. 2.2 as `make pipeline BUDGET=paper` runs it: split by game -> pi' = WM SFT on the share -> the filter
    scores the other games with pi' (and records that it did); no game of the share reaches the filtered file."""
    run = lambda *argv: train_wm.main(train_wm.parse_args([str(a) for a in argv]))
    split, pi, filt = tmp_path / "split", tmp_path / "pi_prime", tmp_path / "filter"
    assert run("--mode", "split", "--triplets", triplets, "--val-frac", "0.5", "--out", split) == dict(
        heldout=5, train=5
    )
    run(
        *["--mode", "sft", "--triplets", split / "heldout.jsonl", "--heldout", split / "train.jsonl", "--val-size", 1],
        *["--batch-size", 2, "--max-steps", 1, "--lora-rank", 4, "--max-new-tokens", 8, "--no-start-eval", "--out", pi],
    )
    trained = torch.load(pi / "checkpoint" / "trainer.pt", weights_only=False)["args"]
    assert (trained["mode"], trained["triplets"]) == ("sft", str(split / "heldout.jsonl"))
    model = pi / "checkpoint" / "model"
    stats = run(
        *[
            "--mode",
            "filter",
            "--model",
            model,
            "--triplets",
            split / "train.jsonl",
            "--heldout",
            split / "heldout.jsonl",
        ],
        *["--filter-k", 2, "--max-new-tokens", 8, "--out", filt],  # no tags yet: nothing easy, all kept
    )
    assert read_jsonl(filt / "metrics.jsonl")[0]["model"] == str(model) == stats["model"]
    share = {t["game"] for t in read_jsonl(split / "heldout.jsonl")}
    train = read_jsonl(split / "train.jsonl")
    kept = read_jsonl(filt / "triplets.filtered.jsonl")
    assert len(share) == 1 and not share & {t["game"] for t in train} and stats["triplets"] == len(train) == 5
    assert kept and not share & {t["game"] for t in kept} and {t["id"] for t in kept} <= {t["id"] for t in train}
    assert len(kept) == 5 and stats["easy_fraction"] == 0  # the kept mix: the share of invalid actions
    assert stats["invalid_fraction"] == stats["kept_invalid_fraction"] == sum(not t["valid"] for t in train) / 5
    # forgetting of a LoRA run says its weights changed are the merged update's, and prints the EvalScope commands
    import evaluate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(dict(prompt="Name a colour.", answer="Red.")) + "\n")
    argv = ["--forgetting", "smollm2-135m", "--model", f"pi={model}", "--prompts", prompts, "--out", tmp_path / "f"]
    evaluate.main(evaluate.parse_args([str(a) for a in argv]))
    table, printed = (tmp_path / "f" / "forgetting.md").read_text(), capsys.readouterr().out
    assert "| pi (LoRA r 4) | " in table and "merged update" in table and "not comparable" in table
    assert f"evalscope eval --model {model} --datasets mmlu_redux ifeval math_500 gsm8k gpqa_diamond" in printed
    assert "evalscope eval --model smollm2-135m " in printed and '"start_date": "2025-01-01"' in printed
