"""The report of the CPU experiment (`make pipeline`, `evaluate.py --report RUN`): every arm's held-out
world-model scores over seeds, its forgetting, and one figure, from the JSONL the stages wrote in RUN:

  collect/ heldout/ warmup_data/ pi_data/   triplets (training, held-out, format warm-up, pi'), disjoint games
  warmup/                          the format warm-up (WM SFT in RWML's prompt); its last held-out scores are the
                                   RWML arms' step 0
  pi_prime/                        pi', the filter's model: WM SFT from the warm-up checkpoint on pi_data; its step 0
                                   scores the warm-up checkpoint in WM SFT's prompt: the WM SFT arms' step 0
  filter/                          the easy-triplet filter (pi' scores the training triplets) the arms train on
  arms/<arm>_s<seed>/              train_wm.py runs from the warm-up checkpoint: same updates, same triplets
  forgetting*/forgetting.json      evaluate.py --forgetting of the arms against the warm-up checkpoint
  eval/table.md                    the brief Table 1 pass

Writes RUN/report.md and RUN/report.png (and RUN/judge.png when the judge arms ran: `make ablations`).
"""

import json
import re
import statistics
from collections import Counter
from pathlib import Path

from support.runs import plot_metrics, read_jsonl, write_jsonl
from support.schema import METRICS, TRIPLET

ARMS = {  # folder prefix -> the arm's name (in the order of the tables)
    "rwml": "RWML",
    "wm_sft": "WM SFT (continued)",
    "rwml_no_filter": "RWML, no easy-triplet subsampling",
    "rwml_judge": "RWML, LLM judge (a score in [0, 1])",
    "rwml_judge_binary": "RWML, LLM judge (0.0 / 1.0)",
}
SCORES = ("reward", "similarity", "format", "exact", "valid/reward", "invalid/reward")


def collapse(predicted, real):
    """How varied a world model's predicted next states are (None: no <next_state> written) against the real
    ones: distinct predictions, the most common one and its share, and whether the model has `collapsed`: that
    prediction covers most of the set and at least half of the triplets whose real next state is something
    else (a model right on every "Nothing happens." of a set with 60% of them is not collapsed; one that writes
    it for 90% is)."""
    n = max(1, len(predicted))
    top, count = Counter(predicted).most_common(1)[0] if predicted else (None, 0)
    right = sum(r == top for r in real)  # the triplets for which the top prediction is the real next state
    collapsed = top is not None and count > n / 2 and count - right >= (n - right) / 2 and n - right > 0
    return dict(distinct=len(set(predicted)), top=top, top_share=count / n, collapsed=collapsed)


def spread_warning(predictions):
    """The line a run or the report prints when a model's held-out predictions (records with `output` and
    `next_state`) have collapsed onto one, else None."""
    from reward import parse_next_state  # (reward.py imports nothing of the project)

    c = collapse([parse_next_state(p["output"]) for p in predictions], [p["next_state"] for p in predictions])
    if c["collapsed"]:
        return (
            f"collapsed: {c['top_share']:.0%} of the {len(predictions)} held-out predictions are {c['top']!r} "
            f"({c['distinct']} distinct)"
        )
    return None


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def cell(xs, scale=1.0, digits=3):
    """mean ± std of a score over seeds (one seed: its value)."""
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{scale * xs[0]:.{digits}f}"
    m, s = mean_std([scale * x for x in xs])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def arm_runs(run):
    """{arm: {seed: metrics rows}} of the arms in run/arms that have held-out scores, in ARMS order."""
    found = {}
    for folder in sorted((run / "arms").glob("*_s*")):
        arm, _, seed = folder.name.rpartition("_s")
        rows = read_jsonl(folder / "metrics.jsonl", METRICS) if (folder / "metrics.jsonl").exists() else []
        if any("heldout/reward" in r for r in rows):  # a run still in its first updates is left out
            found.setdefault(arm, {})[int(seed)] = rows
    return {a: found[a] for a in [*ARMS, *sorted(set(found) - set(ARMS))] if a in found}


def curve(rows, start, key="heldout/reward"):
    """(updates, values) of a held-out score, the start checkpoint's value at update 0 (where it was scored)."""
    pts = [(0, start[key])] * (start is not None) + [(r["step"], r[key]) for r in rows if key in r and r["step"] > 0]
    return [p[0] for p in pts], [p[1] for p in pts]


def data_lines(run, scored):
    """Triplets of each collection: games, count, share of invalid actions (held-out: the `scored` first ones)."""
    lines = ["| Triplets | From games | Count | Invalid actions |", "|---|---|---|---|"]
    for folder, what in (
        ("warmup_data", "format warm-up"),
        ("pi_data", "π′ (the filter's model)"),
        ("collect", "training"),
        ("heldout", "held-out, scored"),
    ):
        path = run / folder / "triplets.jsonl"
        if path.exists():
            t = read_jsonl(path, TRIPLET, required=("game", "valid"))[: scored if folder == "heldout" else None]
            games = len({x["game"] for x in t})
            lines.append(f"| {what} | {games} | {len(t)} | {100 * sum(not x['valid'] for x in t) / len(t):.1f}% |")
    return lines


def write_report(run):
    runs, warm = arm_runs(run), read_jsonl(run / "warmup" / "metrics.jsonl", METRICS)
    # Every arm starts from the warm-up checkpoint, but each arm prompts it its own way (Tables A4, A5): the RWML
    # arms' step 0 is the warm-up's last held-out score (RWML's prompt), WM SFT's is pi''s step 0 (WM SFT's prompt).
    pi = run / "pi_prime" / "metrics.jsonl"
    pi = [r for r in read_jsonl(pi, METRICS) if r["step"] == 0 and "heldout/reward" in r] if pi.exists() else []
    starts = {"rwml": [r for r in warm if "heldout/reward" in r][-1], "wm_sft": pi[0] if pi else None}
    start_of = lambda arm: starts["wm_sft" if arm.startswith("wm_sft") else "rwml"]
    start = {k.removeprefix("heldout/"): v for k, v in starts["rwml"].items()}
    final = {
        a: [[r for r in rows if "heldout/reward" in r][-1] for rows in seeds.values()] for a, seeds in runs.items()
    }
    forget, eta = {}, None
    for path in sorted(run.glob("forgetting*/forgetting.json")):
        res = json.loads(path.read_text())
        eta = res["eta"]
        for m in res["models"]:
            forget.setdefault(m["name"].rpartition("_s")[0], []).append(m)
    filt = run / "filter" / "metrics.jsonl"
    filt = read_jsonl(filt, METRICS)[0] if filt.exists() else None

    md = ["# The CPU experiment: world-model learning on the tiny model", ""]
    every_row = [r for rows in [warm, *(x for s in runs.values() for x in s.values())] for r in rows]
    counts = [r["heldout/triplets"] for r in every_row if "heldout/triplets" in r]  # how many were scored
    md += ["## Data", ""] + data_lines(run, int(counts[0]) if counts else None)
    if filt:
        mix = (
            f" (of the invalid actions' triplets {filt['easy_invalid']:.0%}, of the valid {filt['easy_valid']:.0%})"
            f"; {filt['kept']} kept, invalid actions {filt['invalid_fraction']:.0%} of all -> "
            f"{filt['kept_invalid_fraction']:.0%} of the kept"
            if "kept_invalid_fraction" in filt
            else f"; {filt['kept']} kept"
        )
        md += [
            "",
            f"Easy-triplet filter (scored by {filt.get('model', 'the warm-up model')}): {filt['easy_fraction']:.0%} of "
            f"{filt['triplets']} training triplets easy{mix}.",
        ]
    updates = {a: max(r["step"] for rows in s.values() for r in rows) for a, s in runs.items()}
    md += ["", "## Held-out world-model scores (greedy; mean ± std over seeds)", ""]
    md += [
        "| Arm | Seeds | Updates | Reward | Similarity | Format | Exact | Reward, valid actions | Reward, invalid "
        "| Distinct predictions | Most common's share |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, what in (("rwml", "RWML's prompt: RWML's step 0"), ("wm_sft", "WM SFT's prompt: WM SFT's step 0")):
        if starts[key] is None:
            continue
        s0 = {k.removeprefix("heldout/"): v for k, v in starts[key].items()}
        md.append(
            f"| warm-up checkpoint ({what}) | – | 0 | "
            + " | ".join(f"{s0[k]:.3f}" if k in s0 else "–" for k in SCORES)
            + " | "
            + " | ".join(cell([s0[k]], digits=d) if k in s0 else "–" for k, d in (("distinct", 0), ("top_share", 2)))
            + " |"
        )
    for a, rows in final.items():
        md.append(
            f"| {ARMS.get(a, a)} | {len(rows)} | {updates[a]} | "
            + " | ".join(cell([r[f"heldout/{k}"] for r in rows if f"heldout/{k}" in r]) for k in SCORES)
            + " | "
            + " | ".join(
                cell([r[f"heldout/{k}"] for r in rows if f"heldout/{k}" in r], digits=d)
                for k, d in (("distinct", 0), ("top_share", 2))
            )
            + " |"
        )
    collapsed = [
        f"- {ARMS.get(a, a)}, seed {seed}: {line}"
        for a, seeds in runs.items()
        for seed in seeds
        for path in [run / "arms" / f"{a}_s{seed}" / "heldout_predictions.jsonl"]
        if path.exists()
        for line in [spread_warning(read_jsonl(path))]
        if line
    ]
    md += ["", "Collapsed arms (one prediction for most of the held-out set):", "", *collapsed] if collapsed else []
    if forget:
        md += ["", "## Forgetting against the warm-up checkpoint (mean ± std over seeds)", ""]
        ppl0 = next(iter(forget.values()))[0]["start_perplexity"]
        md += [
            f"| Arm | Weights changed (%, η = {eta:g}) | KL on general prompts (nats/token) | "
            f"Perplexity (start {ppl0:.2f}) |",
            "|---|---|---|---|",
        ]
        for a, ms in forget.items():
            md.append(
                f"| {ARMS.get(a, a)} | {cell([m['weights_changed'] for m in ms], 100, 2)} | "
                f"{cell([m['kl'] for m in ms], digits=4)} | {cell([m['perplexity'] for m in ms], digits=2)} |"
            )
    if (run / "eval" / "table.md").exists():
        md += ["", "## Policy RL and Table 1 (the mechanics only: the tiny model writes no admissible action)", ""]
        md += (run / "eval" / "table.md").read_text().splitlines()
    md += ["", "![report](report.png)"]
    judges = [a for a in runs if a.startswith("rwml_judge")]
    if judges:
        md += ["", "## Reward hacking: what the judge pays for and what matches (mean over seeds)", ""]
        md += [
            "| Arm | Judge's reward, update 1 → last | Sim-to-real reward of the same samples | Held-out reward |",
            "|---|---|---|---|",
        ]
        for a in judges:
            updates = [[r for r in rows if "train/optimised_reward" in r] for rows in runs[a].values()]
            change = lambda key: " → ".join(f"{statistics.mean(u[i][key] for u in updates):.3f}" for i in (0, -1))
            held = statistics.mean(r["heldout/reward"] for r in final[a])
            md.append(
                f"| {ARMS.get(a, a)} | {change('train/optimised_reward')} | {change('train/reward')} | "
                f"{start['reward']:.3f} → {held:.3f} |"
            )
        md += ["", "![judge](judge.png)"]
    (run / "report.md").write_text("\n".join(md) + "\n")
    plot_report(run, runs, start_of, final, forget, judges)
    print("\n".join(md))
    print(f"-> {run}/report.md, {run}/report.png")


def band(ax, runs_of_arm, start, key, label):
    """The mean curve of `key` over seeds, with a ± std band."""
    curves = [curve(rows, start, key) for rows in runs_of_arm.values()]
    xs = curves[0][0]
    ys = [[c[1][i] for c in curves if i < len(c[1])] for i in range(len(xs))]
    m = [statistics.mean(y) for y in ys]
    s = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
    (line,) = ax.plot(xs, m, marker="o", label=label)
    ax.fill_between(xs, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.2, color=line.get_color())


def plot_report(run, runs, start_of, final, forget, judges):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for a, seeds in runs.items():
        band(axes[0], seeds, start_of(a), "heldout/reward", ARMS.get(a, a))
    axes[0].set(title="held-out reward (τ_d) over updates, ± std over seeds", xlabel="update", ylabel="reward")
    axes[0].legend(fontsize=7)
    keys = [
        k
        for k in ("reward", "valid/reward", "invalid/reward", "similarity", "exact")
        if any(f"heldout/{k}" in r for rows in final.values() for r in rows)
    ]  # no invalid actions collected: no such bar
    width = 0.8 / max(1, len(final))
    for j, (a, rows) in enumerate(final.items()):
        stats = [mean_std([r.get(f"heldout/{k}", 0.0) for r in rows]) for k in keys]
        axes[1].bar(
            [i + j * width for i in range(len(keys))],
            [m for m, _ in stats],
            width,
            yerr=[s for _, s in stats],
            capsize=2,
            label=ARMS.get(a, a),
        )
    axes[1].set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], keys, fontsize=8)
    axes[1].set(title="final held-out scores, mean ± std over seeds")
    axes[1].legend(fontsize=7)
    if forget:
        names = list(forget)
        for k, (key, scale, label) in enumerate((("weights_changed", 100, "weights changed (%)"), ("kl", 1, "KL"))):
            ax = axes[2] if k == 0 else axes[2].twinx()
            stats = [mean_std([scale * m[key] for m in forget[a]]) for a in names]
            ax.bar(
                [i + (k - 0.5) * 0.4 for i in range(len(names))],
                [m for m, _ in stats],
                0.4,
                yerr=[s for _, s in stats],
                capsize=2,
                color=f"C{k}",
                label=label,
            )
            ax.set_ylabel(label, color=f"C{k}")
        axes[2].set_xticks(range(len(names)), [ARMS.get(a, a) for a in names], fontsize=7, rotation=15)
        axes[2].set(title="forgetting vs the warm-up checkpoint (KL on general prompts)")
    fig.tight_layout()
    fig.savefig(run / "report.png", dpi=100)
    plt.close(fig)
    if judges:
        fig, axes = plt.subplots(1, len(judges), figsize=(6 * len(judges), 4), squeeze=False)
        for ax, a in zip(axes.flat, judges):
            seeds = runs[a]
            train_rows = {s: [r for r in rows if "train/optimised_reward" in r] for s, rows in seeds.items()}
            for key, label in (
                ("train/optimised_reward", "judge's reward (training samples)"),
                ("train/reward", "sim-to-real reward (same samples)"),
            ):
                curves = [([r["step"] for r in rows], [r[key] for r in rows]) for rows in train_rows.values()]
                xs = curves[0][0]
                m = [statistics.mean(c[1][i] for c in curves) for i in range(len(xs))]
                ax.plot(xs, m, marker=".", label=label)
            band(ax, seeds, start_of(a), "heldout/reward", "held-out sim-to-real reward")
            ax.set(title=ARMS.get(a, a), xlabel="update", ylabel="reward (mean over seeds)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run / "judge.png", dpi=100)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# What train_wm.py writes and prints when a run ends
# ---------------------------------------------------------------------------------------------
EASY_TARGET = 0.3  # the easy share the paper's filter tau_d was chosen for (Table A2)


def filter_summary(args, scored, easy, kept):
    """The easy-triplet filter's metrics.jsonl (one row) and lines: the easy share beside the paper's ~30%, and
    on ALFWorld which actions the filter found easy. Returns the row."""
    share = lambda xs, test: sum(map(test, xs)) / max(1, len(xs))
    stats = dict(
        step=0,
        model=str(args.model),  # the model that scored: pi' in the paper's protocol
        filter_tau=args.filter_tau,
        tau_easy=args.tau_easy,
        triplets=len(scored),
        easy_fraction=share(easy, bool),
        kept=len(kept),
        mean_filter_reward=sum(s["filter_reward"] for s in scored) / max(1, len(scored)),
    )
    mix = ""
    if all("valid" in s for s in scored):  # ALFWorld: which actions the filter found easy, and the kept mix
        invalid = [s for s in scored if not s["valid"]]
        stats.update(
            invalid_fraction=share(scored, lambda s: not s["valid"]),
            easy_invalid=share(invalid, lambda s: s["filter_reward"] > args.tau_easy),
            easy_valid=share([s for s in scored if s["valid"]], lambda s: s["filter_reward"] > args.tau_easy),
            kept_invalid_fraction=share(kept, lambda s: not s["valid"]),
        )
        mix = (
            f"; easy: {stats['easy_invalid']:.0%} of the invalid actions' triplets, {stats['easy_valid']:.0%} of the "
            f"valid; invalid actions {stats['invalid_fraction']:.0%} of all -> {stats['kept_invalid_fraction']:.0%} "
            "of the kept"
        )
    out = Path(args.out)
    write_jsonl(out / "metrics.jsonl", [stats])
    print(
        f"filter model {args.model} (tau_d {args.filter_tau}, easy: mean reward > {args.tau_easy}): easy fraction "
        f"{stats['easy_fraction']:.3f} (the paper set tau_d for ~{EASY_TARGET:.0%}), kept {len(kept)} of "
        f"{len(scored)}{mix} -> {out}/triplets.filtered.jsonl"
    )
    print(
        f"next: python train_wm.py --mode rwml --triplets {out}/triplets.filtered.jsonl --heldout {out}/heldout.jsonl"
        " --model ... --out ...  (the same for --mode sft: the held-out games, set aside before the filter)"
    )
    return stats


def wm_summary(out):
    """A train_wm run's curves (metrics.png), its held-out scores at the first and last evaluation, and its
    warnings (collapsed or cut predictions, no learning signal). Returns the metrics' rows."""
    from support.lm import cut_warning

    plot_metrics(out / "metrics.jsonl")
    rows = read_jsonl(out / "metrics.jsonl")
    evals = [r for r in rows if "heldout/reward" in r]
    first, last = evals[0], evals[-1]
    print(
        f"held-out reward {first['heldout/reward']:.3f} (step {first['step']}) -> {last['heldout/reward']:.3f} "
        f"(step {last['step']}), similarity {first['heldout/similarity']:.3f} -> {last['heldout/similarity']:.3f}; "
        f"{last['heldout/distinct']:.0f} distinct predictions of {last['heldout/triplets']:.0f}"
    )
    updates = [r for r in rows if "train/groups" in r]
    warnings = [
        spread_warning(read_jsonl(out / "heldout_predictions.jsonl")),
        cut_warning(sum(r["train/truncated"] for r in updates) / max(1, len(updates)), "RWML samples")
        if updates
        else None,
        cut_warning(last.get("heldout/truncated", 0), "held-out predictions"),
        "no update had a learning signal: every group's G rewards were equal (format "
        f"{sum(r['train/format'] for r in updates) / len(updates):.0%}: a model that writes no <next_state> needs "
        "the format warm-up, docs/stages.md)"
        if updates and all(r["train/no_signal_groups"] == r["train/groups"] for r in updates)
        else None,
    ]
    print(*[w for w in warnings if w], sep="\n")
    ckpt = out / "checkpoint"
    print(f"next: python train_policy.py --model {ckpt}/model --out ...  (or evaluate.py --model NAME={ckpt}/model)")
    return rows


# ---------------------------------------------------------------------------------------------
# What evaluate.py writes: Table 1's Markdown, the world models' table, forgetting's table and figure
# ---------------------------------------------------------------------------------------------
SPLIT_NAMES = {"valid_seen": "ID", "valid_unseen": "OOD"}


def slug(name):
    """A row name as a folder name: "RWML + Policy RL" -> "rwml_policy_rl"."""
    return re.sub(r"[^a-z0-9.-]+", "_", name.lower()).strip("_")


def pct(xs):
    m, s = mean_std([100 * x for x in xs])
    return f"{m:.1f} ± {s:.1f}"


def table(results):
    """Markdown in the shape of the paper's Tables 1 and 2: ID / OOD / AVG success (%) on ALFWorld, or one
    column per τ²-bench domain and AVG (the mean of the domains, and over tasks: weighted by each domain's
    tasks), mean ± std over runs, one row per model; τ²: the user and τ²'s own metrics (average reward, pass^k);
    then each model's invalid-action rate, episode length and (ALFWorld) success per task type; τ²: the agent's
    sampling temperature."""
    cols = list(results[0]["splits"])
    tau2 = results[0].get("env") == "tau2"
    avg = (["AVG (mean of domains)", "AVG (over tasks)"] if tau2 else ["AVG"]) if len(cols) > 1 else []
    head = ["Method"] + [f"{SPLIT_NAMES[s]} ({s})" if s in SPLIT_NAMES else s.capitalize() for s in cols] + avg
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        splits = [res["splits"][s] for s in cols]
        row = [res["name"]] + [pct(r["success"]) for r in splits]
        per_run = list(zip(*(r["success"] for r in splits)))  # each run: every column's success
        if avg:
            row.append(pct([statistics.mean(v) for v in per_run]))
        if len(avg) > 1:
            games = [r["games"] for r in splits]
            row.append(pct([sum(g * x for g, x in zip(games, v)) / sum(games) for v in per_run]))
        lines.append("| " + " | ".join(row) + " |")
    if tau2:  # Table 1's τ² rows compare only against one user; τ²'s own metrics (tau2.metrics.agent_metrics)
        users = sorted({(r["user_model"], r["user_temperature"]) for r in results}, key=str)
        lines += [
            "",
            "User simulator: "
            + "; ".join(
                "each row's own model (--self-user): rows not comparable"
                if u == "self"
                else f"{u} (temperature {t:g}), the same for every row"
                for u, t in users
            ),
        ]
        ks = [k for k in results[0]["splits"][cols[0]]["tau2"] if k.startswith("pass^")]
        head = ["Method", "Domain", "Avg reward"] + ks
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for res in results:
            for s in cols:
                m = res["splits"][s]["tau2"]
                lines.append("| " + " | ".join([res["name"], s] + [f"{m[k]:.3f}" for k in ["avg_reward", *ks]]) + " |")
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
    if tau2:
        temps = ", ".join(f"{t:g}" for t in sorted({r["temperature"] for r in results}))
        lines += [
            "",
            f"Agent sampling temperature {temps} (evaluate.py --temperature; its default 0.4 is the project's choice: "
            "the paper does not state its evaluation temperature; τ²'s own runs sample the agent at 0.0)",
        ]
    return "\n".join(lines)


def wm_table(results):
    """Held-out reward, similarity, format and exact-match rates; the reward on valid / invalid actions."""
    lines = [
        "| World model | Held-out reward | Similarity | Format | Exact | Reward, valid actions | Reward, invalid |",
        "|---|---|---|---|---|---|---|",
    ]
    cell = lambda r, k: f"{r[k]:.3f}" if k in r else "–"
    return "\n".join(
        lines
        + [
            f"| {r['name']} | {r['reward']:.3f} | {r['similarity']:.3f} | {r['format']:.2f} | {r['exact']:.2f} | "
            f"{cell(r, 'valid/reward')} | {cell(r, 'invalid/reward')} |"
            for r in results
        ]
    )


def forgetting_table(res, groups):
    """forgetting.md: weights changed, KL from the start and perplexity per model, then weights changed per module
    group (`groups`, in the paper's order)."""
    ppl = res["models"][0]["start_perplexity"]
    head = (
        f"| Model | Weights changed (η = {res['eta']:g}) | KL from start (nats/token) | Perplexity (start {ppl:.2f}) |"
    )
    rows = [
        f"| {m['name']}{' (LoRA r ' + str(m['lora_rank']) + ')' if m.get('lora_rank') else ''} | "
        f"{100 * m['weights_changed']:.2f}% | {m['kl']:.4f} | {m['perplexity']:.2f} |"
        for m in res["models"]
    ]
    notes = [
        "",
        f"Against {res['start']}. The share of weights changed of a LoRA run counts its merged update W + scale·BA "
        "(every weight of an adapted matrix moves by a low-rank product): not comparable with the paper's figure, "
        "which is of full fine-tuning.",
    ]
    modules = [
        "",
        "Weights changed per module group (paper Figure A1b; per layer: forgetting.png, forgetting.json):",
        "",
        "| Model | " + " | ".join(groups) + " |",
        "|---|" + "---|" * len(groups),
        *(
            f"| {m['name']} | " + " | ".join(f"{100 * m['modules'][g]:.2f}%" for g in groups) + " |"
            for m in res["models"]
        ),
    ]
    return "\n".join(
        [head, "|---|---|---|---|", *rows, *(notes if any(m.get("lora_rank") for m in res["models"]) else []), *modules]
    )


def plot_weight_changes(res, png, groups):
    """The paper's Figure 3 / A1 for these models: the share of weights changed per layer, and per module group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_layer, by_module) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(res["models"])
    for i, m in enumerate(res["models"]):
        layers = sorted(m["layers"], key=int)
        by_layer.plot([int(k) for k in layers], [100 * m["layers"][k] for k in layers], marker=".", label=m["name"])
        by_module.bar([j + i * width for j in range(len(groups))], [100 * m["modules"][g] for g in groups], width)
    by_layer.set(xlabel="layer index", ylabel=f"weights changed (%, η = {res['eta']:g})", title="per layer")
    by_module.set_xticks([j + width * (len(res["models"]) - 1) / 2 for j in range(len(groups))], groups, fontsize=7)
    by_module.set(title="per module group")
    by_layer.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# the paper's general benchmarks (Table 3): MMLU-Redux, IFEval, MATH-500, GSM8k, GPQA-Diamond and LiveCodeBench
# (problems of 2025-01-01 to 2025-04-30), sampled at temperature 1.0 with up to 16k tokens, by EvalScope, which needs
# the network to fetch them
EVALSCOPE = (
    "evalscope eval --model {path} --datasets mmlu_redux ifeval math_500 gsm8k gpqa_diamond live_code_bench "
    '--dataset-args \'{{"live_code_bench": {{"extra_params": {{"start_date": "2025-01-01", '
    '"end_date": "2025-04-30"}}}}}}\' --generation-config \'{{"temperature": 1.0, "max_tokens": 16384}}\' '
    "--work-dir {out}"
)


def benchmark_commands(res, out):
    """The EvalScope commands that score the start and every model on the paper's general benchmarks (Table 3)."""
    models = [("start", res["start"])] + [(m["name"], m["path"]) for m in res["models"]]
    return [EVALSCOPE.format(path=path, out=Path(out) / "evalscope" / slug(name)) for name, path in models]
