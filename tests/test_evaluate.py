"""Evaluation on both ALFWorld evaluation splits with the real tiny model."""

import json

import pytest

from evaluate import evaluate, evaluate_wm, main, parse_args, slug, table
from reward import Embeddings


def test_evaluate_writes_results_and_a_table_1_shaped_markdown(tiny, tmp_path):
    args = parse_args(
        ["--games", "1", "--runs", "2", "--max-steps", "2", "--max-new-tokens", "16", "--out", str(tmp_path)]
    )
    results = evaluate(args, *tiny, "smollm2-135m", tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    for split in ("valid_seen", "valid_unseen"):
        r = results["splits"][split]
        assert r["games"] == 1 and len(r["success"]) == len(r["invalid_rate"]) == 2
        assert all(0 <= x <= 1 for x in r["success"] + r["invalid_rate"]) and r["mean_steps"] == [2.0, 2.0]
        assert (tmp_path / "run1" / split / "rollouts.jsonl").exists()
    md = table([results, dict(results, name="again")]).splitlines()
    assert md[0] == "| Method | ID (valid_seen) | OOD (valid_unseen) | AVG |"
    assert md[2].startswith("| smollm2-135m | ") and md[2].count("±") == 3 and md[3].startswith("| again | ")
    assert md[7].startswith("| smollm2-135m | valid_seen | 100.0 ± 0.0 | 2.0 | ")  # the tiny model: all actions invalid
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
    assert json.loads(capsys.readouterr().out) == dict(reward=0.5, similarity=pytest.approx(1.0, abs=1e-5), format=0.5)
