"""Evaluation on both ALFWorld evaluation splits with the real tiny model."""

import json

from evaluate import evaluate, parse_args, table


def test_evaluate_writes_results_and_a_table_1_shaped_markdown(tiny, tmp_path):
    args = parse_args(["--games", "1", "--runs", "2", "--max-steps", "2", "--max-new-tokens", "16", "--out", str(tmp_path)])
    results = evaluate(args, *tiny)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    for split in ("valid_seen", "valid_unseen"):
        r = results["splits"][split]
        assert r["games"] == 1 and len(r["success"]) == len(r["invalid_rate"]) == 2
        assert all(0 <= x <= 1 for x in r["success"] + r["invalid_rate"]) and r["mean_steps"] == [2.0, 2.0]
        assert (tmp_path / "run1" / split / "rollouts.jsonl").exists()
    md = table(results).splitlines()
    assert md[0] == "| Method | ID (valid_seen) | OOD (valid_unseen) | AVG |"
    assert md[2].startswith("| smollm2-135m | ") and md[2].count("±") == 3
    assert (tmp_path / "metrics.png").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_table_averages_id_and_ood_per_run():
    results = dict(name="m", splits={
        "valid_seen": dict(success=[0.5, 0.25], invalid_rate=[0.0, 0.0], mean_steps=[3, 3], per_task_type={}),
        "valid_unseen": dict(success=[0.0, 0.25], invalid_rate=[0.0, 0.0], mean_steps=[3, 3], per_task_type={})})
    # per-run AVG = (50+0)/2, (25+25)/2 = 25, 25 -> 25.0 ± 0.0
    assert table(results).splitlines()[2] == "| m | 37.5 ± 17.7 | 12.5 ± 17.7 | 25.0 ± 0.0 |"
