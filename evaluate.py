"""Evaluation (RWML paper, Sec. 4, Tables 1 and 2): task success of a policy on ALFWorld's valid_seen (ID)
and valid_unseen (OOD) splits, or on τ²-bench's test tasks per domain, mean ± std over runs, with the
invalid-action (τ²: invalid tool-call) rate.

    python evaluate.py --model smollm2-135m --games 10 --runs 3 --out runs/eval
    python evaluate.py --env tau2 --domain retail telecom airline --runs 3 --out runs/eval_tau2
    python evaluate.py --model Base=smollm2-135m "RWML + Policy RL=runs/rwml_policy_rl/checkpoint/model" ...

--model takes one or more HF ids or folders, each optionally as NAME=PATH (NAME is its row in the
table). Writes, per model in --out/<name>/: run{r}/{split}/rollouts.jsonl (every episode, readable),
metrics.jsonl (one line per run), results.json; and --out/table.md, the Markdown table shaped like the
paper's Table 1 (one row per model; τ²: Retail / Telecom / Airline / AVG), which is also printed.

The world model and its reward (the command line of reward.py):

    python evaluate.py --wm runs/rwml/heldout.jsonl --model runs/rwml/checkpoint/model   # held-out WM reward
    python evaluate.py --score predictions.jsonl      # lines with `output` and `next_state`
    python evaluate.py --calibrate runs/collect/triplets.jsonl   # distances that place tau_d
"""

import json
import re
import statistics
from pathlib import Path

from checks import at_least, check_model, claim_out, distance_threshold, fail, parser
from collect import add_play_args, play_settings, record_episodes, select_games
from episode import summary
from lm import TINY_MODEL, load_model
from reward import DEFAULT_EMBEDDER, Embeddings, calibrate, default_tau, mean_scores, sim_to_real
from runs import plot_metrics, read_jsonl, write_jsonl
from train_wm import predict_and_score

SPLIT_NAMES = {"valid_seen": "ID", "valid_unseen": "OOD"}


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument(
        "--model", nargs="+", default=[TINY_MODEL], help="HF ids or folders to evaluate, each PATH or NAME=PATH"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="weights dtype (auto: bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument(
        "--splits",
        nargs="+",
        default=None,
        help="splits to evaluate (default: ALFWorld valid_seen valid_unseen; τ² test)",
    )
    p.add_argument(
        "--games",
        type=at_least(),
        default=None,
        help="N games of each split (τ²: tasks of each domain) "
        "(default: all; ALFWorld 140 / 134, τ² test retail 40, airline 20, telecom 40)",
    )
    p.add_argument("--runs", type=at_least(), default=3, help="independent runs, seeds seed..seed+runs-1 (paper: 3)")
    add_play_args(
        p, max_steps=30, temperature=0.4, batch_games=8
    )  # paper: 30 steps; --batch-games is also --wm's batch
    p.add_argument("--seed", type=int, default=0, help="seed of the first run")
    p.add_argument("--out", default="runs/eval", help="output folder")
    p.add_argument("--resume", action="store_true", help="keep finished episodes of a killed evaluation")
    wm = p.add_argument_group("world model and reward")
    wm.add_argument(
        "--wm", metavar="TRIPLETS", help="score --model's greedy next-state predictions on these (held-out) triplets"
    )
    wm.add_argument(
        "--score", metavar="PREDICTIONS", help="score a JSONL of `output` (with <next_state> tags) and `next_state`"
    )
    wm.add_argument("--calibrate", metavar="TRIPLETS", help="print next-state distance quantiles that place tau_d")
    wm.add_argument(
        "--embedder", default=DEFAULT_EMBEDDER, help="sentence-transformers id (paper: Qwen/Qwen3-Embedding-8B)"
    )
    wm.add_argument(
        "--tau",
        type=distance_threshold(),
        default=None,
        help="tau_d (default: the embedder's calibrated value; 0.4 for τ² triplets)",
    )
    wm.add_argument("--val-size", type=at_least(), default=None, help="with --wm: the first N triplets only")
    args = p.parse_args(argv)
    args.splits = args.splits or (["test"] if args.env == "tau2" else ["valid_seen", "valid_unseen"])
    args.models = [(m.rpartition("=")[0] or m, m.rpartition("=")[2]) for m in args.model]  # [(name, path)]
    return args


def slug(name):
    """A row name as a folder name: "RWML + Policy RL" -> "rwml_policy_rl"."""
    return re.sub(r"[^a-z0-9.-]+", "_", name.lower()).strip("_")


def evaluate_wm(args, model, tok, name, out, embed):
    """Held-out world-model quality: greedy predictions -> mean sim-to-real reward, similarity, format rate."""
    triplets = read_jsonl(args.wm, required=("task", "history", "state", "action", "next_state"))[: args.val_size]
    tau = args.tau if args.tau is not None else default_tau(args.embedder, triplets)
    outputs, recs = predict_and_score(model, tok, triplets, embed, tau, args.max_new_tokens, args.batch_games)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(
        out / "wm_predictions.jsonl",
        [dict(id=t.get("id"), output=o, next_state=t["next_state"], **r) for t, o, r in zip(triplets, outputs, recs)],
    )
    res = dict(name=name, triplets=len(triplets), tau=tau, embedder=args.embedder, **mean_scores(recs))
    (out / "wm_results.json").write_text(json.dumps(res, indent=1))
    return res


def wm_table(results):
    lines = ["| World model | Held-out reward | Similarity | Format |", "|---|---|---|---|"]
    return "\n".join(
        lines + [f"| {r['name']} | {r['reward']:.3f} | {r['similarity']:.3f} | {r['format']:.2f} |" for r in results]
    )


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def pct(xs):
    m, s = mean_std([100 * x for x in xs])
    return f"{m:.1f} ± {s:.1f}"


def table(results):
    """Markdown in the shape of the paper's Tables 1 and 2: ID / OOD / AVG success (%) on ALFWorld, or one
    column per τ²-bench domain and AVG, mean ± std over runs, one row per model; then each model's
    invalid-action rate, episode length and (ALFWorld) success per task type."""
    cols = list(results[0]["splits"])
    head = (
        ["Method"]
        + [f"{SPLIT_NAMES[s]} ({s})" if s in SPLIT_NAMES else s.capitalize() for s in cols]
        + (["AVG"] if len(cols) > 1 else [])
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        row = [res["name"]] + [pct(res["splits"][s]["success"]) for s in cols]
        if len(cols) > 1:
            row.append(pct([statistics.mean(v) for v in zip(*(res["splits"][s]["success"] for s in cols))]))
        lines.append("| " + " | ".join(row) + " |")
    tau2 = results[0].get("env") == "tau2"
    types = [] if tau2 else sorted({t for res in results for s in cols for t in res["splits"][s]["per_task_type"]})
    head = ["Method", "Split", "Invalid tool calls (%)" if tau2 else "Invalid actions (%)", "Mean steps"] + types
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        for s in cols:
            r = res["splits"][s]
            row = [res["name"], s, pct(r["invalid_rate"]), f"{statistics.mean(r['mean_steps']):.1f}"]
            lines.append(
                "| "
                + " | ".join(row + [pct(r["per_task_type"][t]) if t in r["per_task_type"] else "" for t in types])
                + " |"
            )
    return "\n".join(lines)


def evaluate(args, model, tok, name, out):
    """Play every split (τ²: every domain's split) `args.runs` times with the model as policy; return the
    results dict, with one entry per column of the table in results["splits"]."""
    out.mkdir(parents=True, exist_ok=True)
    results = dict(
        name=name, env=args.env, runs=args.runs, max_steps=args.max_steps, temperature=args.temperature, splits={}
    )
    metrics = [dict(run=r) for r in range(args.runs)]  # one line per run: <metric>/<column>
    columns = (
        [(s, dict(split=s)) for s in args.splits]
        if args.env == "alfworld"
        else [
            (d if len(args.splits) == 1 else f"{d}/{s}", dict(split=s, domain=[d]))
            for d in args.domain
            for s in args.splits
        ]
    )
    for split, where in columns:
        per_run = []
        for r in range(args.runs):
            games = select_games(args.env, where["split"], args.games, where.get("domain", args.domain), args.tasks)
            rollouts = record_episodes(
                games,
                where["split"],
                1,
                play_settings(args, seed=args.seed + r, model=name),
                out / f"run{r}" / split,
                args.resume,
                model,
                tok,
                desc=f"eval {split} run {r}",
            )
            per_run.append((rollouts, summary(rollouts)))
            metrics[r].update({f"{k}/{split}": v for k, v in per_run[-1][1].items()})
        types = sorted({x["task_type"] for x in per_run[0][0]})
        results["splits"][split] = dict(
            games=len(per_run[0][0]),
            **{k: [s[k] for _, s in per_run] for k in ("success", "invalid_rate", "mean_steps")},
            per_task_type={
                t: [statistics.mean(x["won"] for x in ro if x["task_type"] == t) for ro, _ in per_run] for t in types
            },
        )
    write_jsonl(out / "metrics.jsonl", metrics)
    plot_metrics(out / "metrics.jsonl", x="run")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def main(args):
    if args.calibrate:
        out = calibrate(
            read_jsonl(args.calibrate, required=("game", "action", "next_state")), Embeddings(args.embedder)
        )
        for name, v in out.items():
            print(f"{name:>14} ({v['pairs']} pairs): d = 1 - cos quantiles 5/25/50/75/95% = {v['quantiles']}")
    elif args.score:
        rows = read_jsonl(args.score, required=("output", "next_state"))
        tau = args.tau if args.tau is not None else default_tau(args.embedder, rows)
        recs = sim_to_real(
            [r["output"] for r in rows],
            [r["next_state"] for r in rows],
            Embeddings(args.embedder),
            tau,
            [r.get("kind") for r in rows],
        )
        print(json.dumps(mean_scores(recs)))
    else:  # every model in turn, then one table
        for _, path in args.models:  # a folder that does not exist says so now, not after the first model's run
            check_model(path)
        if args.wm and args.val_size and args.val_size > len(read_jsonl(args.wm)):
            fail(f"--val-size {args.val_size}: {args.wm} holds only {len(read_jsonl(args.wm))} triplets")
        claim_out(args.out, "evaluate --wm" if args.wm else "evaluate", args.resume)
        embed = Embeddings(args.embedder) if args.wm else None
        results = []
        for name, path in args.models:
            model, tok = load_model(path, dtype=args.dtype)
            out = Path(args.out) / slug(name)
            results.append(
                evaluate_wm(args, model, tok, name, out, embed) if args.wm else evaluate(args, model, tok, name, out)
            )
            del model
        md = wm_table(results) if args.wm else table(results)
        (Path(args.out) / ("wm_table.md" if args.wm else "table.md")).write_text(md + "\n")
        print(md)
        print(f"-> {args.out}/")


if __name__ == "__main__":
    main(parse_args())
