"""Evaluation (RWML paper, Sec. 4, Table 1): task success of a policy on ALFWorld's valid_seen (ID)
and valid_unseen (OOD) splits, mean ± std over runs, per task type, with the invalid-action rate.

    python evaluate.py --model smollm2-135m --games 10 --runs 3 --out runs/demo/eval

Writes, in --out: run{r}/{split}/rollouts.jsonl (every episode, readable), metrics.jsonl (one line
per run and split), results.json, and prints a Markdown table shaped like the paper's Table 1.
"""

import argparse
import json
import statistics
from pathlib import Path

from collect import TINY_MODEL, collect, load_model, plot_metrics, summary, write_jsonl

SPLIT_NAMES = {"valid_seen": "ID", "valid_unseen": "OOD"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=TINY_MODEL, help="HF id, local folder or checkpoint to evaluate")
    p.add_argument("--name", default=None, help="row name in the table (default: --model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="weights dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--splits", nargs="+", default=["valid_seen", "valid_unseen"], help="ALFWorld splits to evaluate")
    p.add_argument("--games", type=int, default=None, help="first N games of each split (default: all, 140 / 134)")
    p.add_argument("--runs", type=int, default=3, help="independent runs, seeds seed..seed+runs-1 (paper: 3)")
    p.add_argument("--max-steps", type=int, default=30, help="steps per episode (paper: 30)")
    p.add_argument("--history", type=int, default=2, help="H: previous turns shown to the agent")
    p.add_argument("--temperature", type=float, default=0.4, help="sampling temperature at evaluation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens the agent may write per turn")
    p.add_argument("--batch-games", type=int, default=8, help="episodes played in parallel")
    p.add_argument("--seed", type=int, default=0, help="seed of the first run")
    p.add_argument("--out", default="runs/eval", help="output folder")
    p.add_argument("--resume", action="store_true", help="keep finished episodes of a killed evaluation")
    return p.parse_args(argv)


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def pct(xs):
    m, s = mean_std([100 * x for x in xs])
    return f"{m:.1f} ± {s:.1f}"


def table(results):
    """Markdown in the shape of the paper's Table 1: ID / OOD / AVG success (%), mean ± std over runs."""
    cols = [s for s in SPLIT_NAMES if s in results["splits"]]
    head = ["Method"] + [f"{SPLIT_NAMES[s]} ({s})" for s in cols] + (["AVG"] if len(cols) > 1 else [])
    row = [results["name"]] + [pct(results["splits"][s]["success"]) for s in cols]
    if len(cols) > 1:
        row.append(pct([statistics.mean(v) for v in zip(*(results["splits"][s]["success"] for s in cols))]))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |", ""]
    lines += ["| Split | Task type | Success (%) | Invalid actions (%) | Mean steps |", "|---|---|---|---|---|"]
    for s in cols:
        r = results["splits"][s]
        lines.append(f"| {s} | all | {pct(r['success'])} | {pct(r['invalid_rate'])} | {statistics.mean(r['mean_steps']):.1f} |")
        for t, v in sorted(r["per_task_type"].items()):
            lines.append(f"| {s} | {t} | {pct(v)} | | |")
    return "\n".join(lines)


def evaluate(args, model=None, tok=None):
    """Play every split `args.runs` times with the model as policy; return the results dict."""
    if model is None:
        model, tok = load_model(args.model, dtype=args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = dict(name=args.name or args.model, model=args.model, runs=args.runs, max_steps=args.max_steps,
                   temperature=args.temperature, splits={})
    metrics = [dict(run=r) for r in range(args.runs)]  # one line per run: <metric>/<split>
    for split in args.splits:
        per_run = []
        for r in range(args.runs):
            run_args = argparse.Namespace(**{**vars(args), "split": split, "seed": args.seed + r, "episodes": 1,
                                             "policy": "model", "epsilon": 0.0, "out": str(out / f"run{r}" / split)})
            rollouts = collect(run_args, model, tok, desc=f"eval {split} run {r}")
            per_run.append((rollouts, summary(rollouts)))
            metrics[r].update({f"{k}/{split}": v for k, v in per_run[-1][1].items()})
        types = sorted({x["task_type"] for x in per_run[0][0]})
        results["splits"][split] = dict(
            games=len(per_run[0][0]),
            **{k: [s[k] for _, s in per_run] for k in ("success", "invalid_rate", "mean_steps")},
            per_task_type={t: [statistics.mean(x["won"] for x in ro if x["task_type"] == t) for ro, _ in per_run]
                           for t in types})
    write_jsonl(out / "metrics.jsonl", metrics)
    plot_metrics(out / "metrics.jsonl", x="run")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    args = parse_args()
    results = evaluate(args)
    print(table(results))
    print(f"-> {args.out}/results.json")
