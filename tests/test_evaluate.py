"""Evaluation on both ALFWorld evaluation splits with the real tiny model."""

import copy
import json

import pytest
import torch

from evaluate import (
    GENERAL_PROMPTS,
    evaluate,
    evaluate_wm,
    forgetting,
    general_drift,
    main,
    parse_args,
    weight_changes,
)
from reward import Embeddings
from support.report import slug, table
from support.runs import read_jsonl


def test_evaluate_writes_results_and_a_table_1_shaped_markdown(tiny, tmp_path):
    args = parse_args(
        ["--games", "1", "--runs", "2", "--max-steps", "1", "--max-new-tokens", "8", "--out", str(tmp_path)]
    )
    results = evaluate(args, *tiny, "smollm2-135m", tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    for split in ("valid_seen", "valid_unseen"):
        r = results["splits"][split]
        assert r["games"] == 1 and len(r["success"]) == len(r["invalid_rate"]) == 2
        assert all(0 <= x <= 1 for x in r["success"] + r["invalid_rate"]) and r["mean_steps"] == [1.0, 1.0]
        assert (tmp_path / "run1" / split / "rollouts.jsonl").exists()
    md = table([results, dict(results, name="again")]).splitlines()
    assert md[0] == "| Method | ID (valid_seen) | OOD (valid_unseen) | AVG |"
    assert md[2].startswith("| smollm2-135m | ") and md[2].count("±") == 3 and md[3].startswith("| again | ")
    assert md[7].startswith("| smollm2-135m | valid_seen | 100.0 ± 0.0 | 1.0 | ")  # the tiny model: all actions invalid
    assert (tmp_path / "metrics.png").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_table_averages_id_and_ood_per_run():
    results = dict(
        name="m",
        splits={
            "valid_seen": dict(success=[0.5, 0.25], invalid_rate=[0.0, 0.0], mean_steps=[3, 3], per_task_type={}),
            "valid_unseen": dict(success=[0.0, 0.25], invalid_rate=[0.0, 0.0], mean_steps=[3, 3], per_task_type={}),
        },
    )
    # per-run AVG = (50+0)/2, (25+25)/2 = 25, 25 -> 25.0 ± 0.0
    assert table([results]).splitlines()[2] == "| m | 37.5 ± 17.7 | 12.5 ± 17.7 | 25.0 ± 0.0 |"


def test_models_are_named_rows():
    args = parse_args(["--model", "smollm2-135m", "RWML + Policy RL=runs/x/checkpoint/model"])
    assert args.models == [("smollm2-135m", "smollm2-135m"), ("RWML + Policy RL", "runs/x/checkpoint/model")]
    assert slug("RWML + Policy RL") == "rwml_policy_rl"


TRIPLET = dict(
    id="g#0#0",
    task="put a mug in the fridge.",
    history=[],
    state="On the desk 1, you see a mug 1.",
    action="take mug 1 from desk 1",
    next_state="You pick up the mug 1 from the desk 1.",
)


def test_wm_evaluation_writes_scored_predictions(tiny, tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text(json.dumps(TRIPLET) + "\n" + json.dumps(dict(TRIPLET, id="g#0#1")) + "\n")
    args = parse_args(["--wm", str(path), "--max-new-tokens", "12"])
    res = evaluate_wm(args, *tiny, "base", tmp_path / "o", Embeddings(args.embedder))
    assert res["triplets"] == 2 and res["tau"] == 0.2 and 0 <= res["reward"] <= res["format"] <= 1
    preds = [json.loads(l) for l in open(tmp_path / "o" / "wm_predictions.jsonl")]
    assert [p["id"] for p in preds] == ["g#0#0", "g#0#1"] and all(
        {"output", "reward", "similarity", "format"} <= p.keys() for p in preds
    )


def test_score_a_predictions_file(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    rows = [
        dict(
            output=f"<think>take</think><next_state>{TRIPLET['next_state']}</next_state>",
            next_state=TRIPLET["next_state"],
        ),
        dict(output="no tags at all", next_state=TRIPLET["next_state"]),
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(parse_args(["--score", str(path)]))
    assert json.loads(capsys.readouterr().out) == dict(
        reward=0.5, similarity=pytest.approx(1.0, abs=1e-5), format=0.5, exact=0.5
    )


def test_weight_changes_count_exactly_the_weights_moved_beyond_eta_of_the_larger_value(tiny):
    """The paper's rule (Sec. 4.2): |w_hat - w| > eta * max(|w|, |w_hat|), over weights finite and non-zero before and
    after; the share per layer and per module group as well as over the model."""
    model = tiny[0]
    moved = copy.deepcopy(model)
    n = sum((p != 0).sum().item() for p in model.parameters())  # tied embeddings count once; zeros do not count
    with torch.no_grad():
        params = dict(moved.named_parameters())
        up = params["model.layers.0.mlp.up_proj.weight"].view(-1)
        assert (up[:20] != 0).all()
        up[:7] *= 1.01  # 7 weights moved by 1% of their value: counted at eta 1e-3
        up[7:12] *= 1 + 1e-4  # 5 moved by 0.01%: not counted
        up[12:16] *= 1.0010005  # 4 grown by 0.10005% of the start, 0.09995% of the larger value: not counted
        up[16:18] = 0.0  # 2 set to zero: no longer counted at all
        params["model.norm.weight"][:3] += 1.0  # 3 more, in another tensor, outside every layer
    assert weight_changes(model, model)["all"] == 0.0
    changes = weight_changes(moved, model, eta=1e-3)
    assert changes["all"] == 10 / (n - 2)
    assert weight_changes(moved, model, eta=1e-5)["all"] == 19 / (n - 2)  # a smaller eta counts the small moves too
    layer0 = sum((p != 0).sum().item() for k, p in model.named_parameters() if k.startswith("model.layers.0."))
    assert changes["layers"][0] == 7 / (layer0 - 2) and changes["layers"][1] == 0.0 and len(changes["layers"]) == 30
    gate_up = sum(
        (p != 0).sum().item() for k, p in model.named_parameters() if k.endswith(("gate_proj.weight", "up_proj.weight"))
    )
    assert changes["modules"]["mlp.gate_up"] == 7 / (gate_up - 2) and changes["modules"]["self_attn.q_proj"] == 0.0
    assert set(changes["modules"]) == {f"self_attn.{m}_proj" for m in "qkvo"} | {"mlp.gate_up", "mlp.down_proj"}


def test_general_drift_is_zero_for_the_start_model_and_grows_when_weights_move(tiny):
    model, tok = tiny
    rows = read_jsonl(GENERAL_PROMPTS)[::10]  # one of each ten: every kind of prompt
    same = general_drift(copy.deepcopy(model), model, tok, rows)
    assert same["kl"] == pytest.approx(0.0, abs=1e-7) and same["perplexity"] == same["start_perplexity"]
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.model.layers[0].mlp.up_proj.weight.mul_(1.05)
    drift = general_drift(moved, model, tok, rows)
    assert drift["kl"] > 1e-4 and drift["perplexity"] != drift["start_perplexity"] == same["start_perplexity"]
    assert 1 < same["perplexity"] < 100  # fluent English for the instruct model: a reference answer is likely


def test_forgetting_counts_changes_below_bf16_resolution_whatever_the_dtype(tiny, tmp_path):
    """Forgetting measures in fp32 even under --dtype bf16: an up_proj moved by 0.15% (above eta 1e-3, below half
    a bf16 step) counts, and its drift is seen; in bf16 both checkpoints would load as the same weights."""
    from test_grpo import tiny_llama

    tok = tiny[1]
    start = tiny_llama(tok, torch.bfloat16).float()  # weights that bf16 holds exactly
    moved = copy.deepcopy(start)
    with torch.no_grad():
        moved.model.layers[0].mlp.up_proj.weight.mul_(1 + 1.5e-3)
    up, up0 = moved.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight
    assert torch.equal(up.bfloat16(), up0.bfloat16()) and not torch.equal(up, up0)
    for name, m in (("start", start), ("moved", moved)):
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(GENERAL_PROMPTS)[:2]))
    argv = ["--forgetting", tmp_path / "start", "--model", f"moved={tmp_path / 'moved'}", "--dtype", "bf16"]
    res = forgetting(parse_args([*map(str, argv), "--prompts", str(prompts), "--out", str(tmp_path / "out")]))
    n = sum((p != 0).sum().item() for p in start.parameters())
    assert res["models"][0]["weights_changed"] == (up != 0).sum().item() / n
    assert res["models"][0]["perplexity"] != res["models"][0]["start_perplexity"]  # in bf16: the same weights


def test_the_general_prompts_cover_four_kinds_of_text():
    rows = read_jsonl(GENERAL_PROMPTS, required=("kind", "prompt", "answer"))
    assert len(rows) == 100 and len({r["prompt"] for r in rows}) == 100
    assert {r["kind"] for r in rows} == {"fact", "arithmetic", "instruction", "code"}
    assert all(r["answer"].strip() for r in rows)


def test_the_report_gives_each_arm_its_mean_and_spread_over_seeds(tmp_path):
    """`evaluate.py --report` on a run folder of known numbers: 2 seeds of RWML, 1 of WM SFT, forgetting."""

    def metrics(folder, *rows):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    held = lambda step, x: {"step": step, "heldout/reward": x, "heldout/similarity": x, "heldout/triplets": 4}
    metrics("warmup", {"step": 1, "train/loss": 1.0}, held(1, 0.1))
    metrics("pi_prime", held(0, 0.3), {"step": 1, "train/loss": 1.0}, held(1, 0.4))  # step 0: WM SFT's start
    spread = lambda distinct, top: {"heldout/distinct": distinct, "heldout/top_share": top}
    metrics("arms/rwml_s0", {"step": 1, "train/reward": 0.0}, held(2, 0.2), held(4, 0.5) | spread(4, 0.25))
    metrics("arms/rwml_s1", held(4, 0.7) | spread(2, 0.75))
    real = ["Nothing happens.", "You arrive at sink 1.", "You pick up the mug 1.", "You open the drawer 1."]
    (tmp_path / "arms" / "rwml_s1" / "heldout_predictions.jsonl").write_text(  # one prediction for 3 of 4: collapsed
        "".join(
            json.dumps(dict(output=f"<next_state>{p}</next_state>", next_state=r)) + "\n"
            for p, r in zip(["Nothing happens."] * 3 + [real[3]], real)
        )
    )
    metrics("arms/wm_sft_s0", held(4, 0.25))
    metrics("arms/wm_sft_s1", {"step": 1, "train/loss": 1.0})  # still in its first updates: left out
    forgetting = [
        dict(name=f"rwml_s{s}", weights_changed=w, kl=k, perplexity=p, start_perplexity=3.0)
        for s, w, k, p in ((0, 0.1, 0.001, 3.1), (1, 0.2, 0.003, 3.3))
    ]
    (tmp_path / "forgetting").mkdir()
    (tmp_path / "forgetting" / "forgetting.json").write_text(json.dumps(dict(eta=1e-3, models=forgetting)))
    main(parse_args(["--report", str(tmp_path)]))
    report = (tmp_path / "report.md").read_text().splitlines()
    # the last held-out scores of each seed: RWML 0.5 and 0.7 -> 0.600 ± 0.141 (sample std); WM SFT one seed
    assert "| RWML | 2 | 4 | 0.600 ± 0.141 | 0.600 ± 0.141 | – | – | – | – | 3 ± 1 | 0.50 ± 0.35 |" in report
    assert "| WM SFT (continued) | 1 | 4 | 0.250 | 0.250 | – | – | – | – | – | – |" in report
    starts = [line for line in report if line.startswith("| warm-up checkpoint")]  # each arm's prompt, its start
    assert starts == [
        "| warm-up checkpoint (RWML's prompt: RWML's step 0) | – | 0 | 0.100 | 0.100 | – | – | – | – | – | – |",
        "| warm-up checkpoint (WM SFT's prompt: WM SFT's step 0) | – | 0 | 0.300 | 0.300 | – | – | – | – | – | – |",
    ]
    collapsed = "- RWML, seed 1: collapsed: 75% of the 4 held-out predictions are 'Nothing happens.' (2 distinct)"
    assert [line for line in report if line.startswith("- ")] == [collapsed]
    assert "| RWML | 15.00 ± 7.07 | 0.0020 ± 0.0014 | 3.20 ± 0.14 |" in report  # weights changed in %, KL, perplexity
    assert (tmp_path / "report.png").stat().st_size > 0


def test_a_collapsed_world_model_writes_one_prediction_where_the_real_next_states_differ():
    """Most of ALFWorld's held-out next states may be "Nothing happens." (invalid actions): a model right on all
    of them has not collapsed; one that also writes it for half the others has; no tags at all is no collapse."""
    from support.report import collapse

    real = ["Nothing happens."] * 6 + [f"You arrive at sink {i}." for i in range(4)]
    assert collapse(real, real) == dict(distinct=5, top="Nothing happens.", top_share=0.6, collapsed=False)
    assert collapse(["Nothing happens."] * 8 + real[8:], real)["collapsed"]  # 2 of the 4 others
    assert not collapse(["Nothing happens."] * 7 + real[7:], real)["collapsed"]  # 1 of 4
    assert not collapse([None] * 10, real)["collapsed"] and collapse([None] * 10, real)["distinct"] == 1
