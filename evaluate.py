"""Evaluation (RWML paper, Sec. 3.2, Tables 1 and 2): task success of a policy on ALFWorld's valid_seen (ID)
and valid_unseen (OOD) splits, or on τ²-bench's test tasks per domain, mean ± std over runs, with the
invalid-action (τ²: invalid tool-call) rate.

    python evaluate.py --model smollm2-135m --games 10 --runs 3 --out runs/eval
    python evaluate.py --env tau2 --domain retail telecom airline --model Base=Qwen/Qwen3-8B --runs 3 \
        --user-model gpt-4.1 --out runs/eval_tau2
    python evaluate.py --model Base=smollm2-135m "RWML + Policy RL=runs/rwml_policy_rl/checkpoint/model" ...

--model takes one or more HF ids or folders, each optionally as NAME=PATH (NAME is its row in the
table). Writes, per model in --out/<name>/: run{r}/{split}/rollouts.jsonl (every episode, readable),
metrics.jsonl (one line per run) and its metrics.png, results.json; and --out/table.md, the Markdown table
shaped like the paper's Table 1 (one row per model; τ²: Retail / Telecom / Airline / AVG, and τ²'s own metrics:
average reward and pass^k per domain), which is also printed. τ²'s user is one fixed model for every row
(--user-model; default: a frozen copy of the first --model).

The world model and its reward (the command line of reward.py):

    python evaluate.py --wm runs/rwml/heldout.jsonl --model runs/rwml/checkpoint/model   # held-out WM reward
    python evaluate.py --score predictions.jsonl      # lines with `output` and `next_state`
    python evaluate.py --calibrate runs/collect/triplets.jsonl   # distances that place tau_d

Forgetting, and the report of the CPU experiment (`make pipeline`):

    python evaluate.py --forgetting runs/warmup/checkpoint/model --model RWML=runs/rwml/checkpoint/model
    python evaluate.py --report runs/pipeline      # report.md + report.png from the runs in that folder
"""

import argparse
import json
import math
import re
import statistics
from pathlib import Path

import torch

from collect import record_episodes, select_games
from grpo import collate, completion_logits
from reward import (
    DEFAULT_EMBEDDER,
    Embeddings,
    calibrate,
    default_tau,
    embedder_bytes,
    mean_scores,
    sim_to_real,
    wm_prompt,
)
from support.checks import at_least, check_model, claim_out, distance_threshold, fail, parser, positive
from support.episode import summary
from support.lm import TINY_MODEL, chat_prompt, cut_warning, load_model, load_tokenizer
from support.memory import CPU_BATCH
from support.play import add_plan_args, add_play_args, plan_batch, play_defaults, play_settings
from support.report import benchmark_commands, forgetting_table, plot_weight_changes, slug, table, wm_table
from support.runs import plot_metrics, read_jsonl, run_stage, write_jsonl
from support.schema import PREDICTION, PROMPT, TRIPLET
from support.triplets import wm_budget
from train_wm import heldout_scores, predict_and_score

GENERAL_PROMPTS = Path(__file__).resolve().parent / "data" / "general_prompts.jsonl"


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC: forgetting (the paper's claim: RWML moves the weights less than WM SFT), a model against its start
# ---------------------------------------------------------------------------------------------
# the paper's module groups (Figure A1b): attention's four projections, the MLP's gate and up together, down
MODULES = dict(q_proj="self_attn.q_proj", k_proj="self_attn.k_proj", v_proj="self_attn.v_proj")
MODULES |= dict(o_proj="self_attn.o_proj", gate_proj="mlp.gate_up", up_proj="mlp.gate_up", down_proj="mlp.down_proj")


@torch.no_grad()
def weight_changes(model, start, eta=1e-3):
    """The share of weights changed from the start (paper Sec. 4.2, App. E, after Zhu et al. 2025): over the whole
    model, per decoder layer (Figure 3, A1a) and per module group (Figure A1b); in fp32 on the weights' device. Tied
    weights count once (named_parameters); a LoRA run is measured on its merged checkpoint (fp32 merged weights:
    lora.merged_state_dict). -> dict(all=share, layers={index: share}, modules={group: share})"""
    before = dict(start.named_parameters())
    counts = {}  # "all", "layer 3", "self_attn.q_proj", ... -> [changed, counted]
    for name, w in model.named_parameters():
        w, w0 = w.detach().float(), before[name].detach().float()
        # ---- EXERCISE 10: the share of weights changed (paper, Sec. 4.2) ----
        # Eq. weight change: a weight changed when |w_hat - w| > eta * max(|w|, |w_hat|), over the weights that are
        # finite and non-zero both before (w0) and after (w)
        counted = w.isfinite() & w0.isfinite() & (w != 0) & (w0 != 0)
        moved = counted & ((w - w0).abs() > eta * torch.maximum(w.abs(), w0.abs()))
        changed, total = moved.sum().item(), counted.sum().item()
        # ---- END EXERCISE 10 ----
        layer = re.search(r"layers\.(\d+)\.", name)
        for key in ("all", layer and f"layer {layer[1]}", MODULES.get(name.split(".")[-2])):
            if key:
                c = counts.setdefault(key, [0, 0])
                c[0], c[1] = c[0] + changed, c[1] + total
    share = {k: c / max(t, 1) for k, (c, t) in counts.items()}
    return dict(
        all=share.pop("all"),
        layers={int(k.split()[1]): v for k, v in share.items() if k.startswith("layer ")},
        modules={k: v for k, v in share.items() if not k.startswith("layer ")},
    )


@torch.no_grad()
def general_drift(model, start, tok, rows, batch_size=8):
    """Drift on general text: the mean per-token KL(start || model) on the reference answers of `rows`
    ({"prompt", "answer"}, teacher-forced after the chat-rendered prompt) and each model's perplexity of them."""
    device = next(model.parameters()).device
    seqs = [
        (
            tok(chat_prompt(tok, r["prompt"]), add_special_tokens=False)["input_ids"],
            tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
        )
        for r in rows
    ]
    kl = nll = nll_start = tokens = 0.0
    for i in range(0, len(seqs), batch_size):
        ids, attn, P = collate(seqs[i : i + batch_size], device)
        mask, target = attn[:, P:].float(), ids[:, P:, None]
        logq = completion_logits(model, ids, attn, P).log_softmax(-1)  # [B, C, vocab]
        logp = completion_logits(start, ids, attn, P).log_softmax(-1)
        kl += ((logp.exp() * (logp - logq)).sum(-1) * mask).sum().item()  # KL(start || model) per token
        nll -= (logq.gather(-1, target).squeeze(-1) * mask).sum().item()
        nll_start -= (logp.gather(-1, target).squeeze(-1) * mask).sum().item()
        tokens += mask.sum().item()
    return dict(kl=kl / tokens, perplexity=math.exp(nll / tokens), start_perplexity=math.exp(nll_start / tokens))


def forgetting(args):
    """Every --model against --forgetting (their start): weights changed, KL and perplexity on general prompts.
    The models load in fp32 whatever --dtype says: in bf16 a change of less than half a bf16 step (0.2-0.4% of a
    weight, above the paper's eta 1e-3) would not count, and the drift would carry bf16's noise."""
    rows = read_jsonl(args.prompts, PROMPT)
    start, tok = load_model(args.forgetting, dtype="fp32")
    shapes = lambda m: {name: w.shape for name, w in m.named_parameters()}
    results = []
    for name, path in args.models:
        model, _ = load_model(path, dtype="fp32")
        if shapes(model) != shapes(start):
            fail(f"{path} is not the architecture of --forgetting {args.forgetting}: its weights cannot be compared")
        changes = weight_changes(model, start, args.eta)
        results.append(
            dict(name=name, path=path, weights_changed=changes["all"], lora_rank=lora(path))
            | dict(layers=changes["layers"], modules=changes["modules"])
            | general_drift(model, start, tok, rows)
        )
        del model
    return dict(start=args.forgetting, eta=args.eta, prompts=str(args.prompts), models=results)


def parse_args(argv=None):
    p = parser(__doc__)
    arg = p.add_argument
    arg("--model", nargs="+", default=[TINY_MODEL], help="HF ids or folders to evaluate, each PATH or NAME=PATH")
    dtypes = "weights dtype (auto: bf16 on CUDA, fp32 on CPU; --forgetting always measures in fp32)"
    arg("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help=dtypes)
    arg("--splits", nargs="+", help="splits to evaluate (default: ALFWorld valid_seen valid_unseen; τ² test)")
    games = "N games of each split (τ²: tasks of each domain; default: all, ALFWorld 140 / 134, τ² 40 / 20 / 40)"
    arg("--games", type=at_least(), help=games)
    arg("--runs", type=at_least(), default=3, help="independent runs, seeds seed..seed+runs-1 (paper: 3)")
    add_play_args(p, temperature=0.4, batch_games=None)  # paper: 30 steps; --batch-games is also --wm's batch
    add_plan_args(p)
    arg("--seed", type=int, default=0, help="seed of the first run")
    arg("--out", default="runs/eval", help="output folder")
    arg("--resume", action="store_true", help="keep finished episodes of a killed evaluation")
    wm = p.add_argument_group("world model and reward").add_argument
    wm("--wm", metavar="TRIPLETS", help="score --model's greedy next-state predictions on these (held-out) triplets")
    wm("--score", metavar="PREDICTIONS", help="score a JSONL of `output` (with <next_state> tags) and `next_state`")
    wm("--calibrate", metavar="TRIPLETS", help="print next-state distance quantiles that place tau_d")
    wm("--embedder", default=DEFAULT_EMBEDDER, help="sentence-transformers id (paper: Qwen/Qwen3-Embedding-8B)")
    wm("--embed-dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA, fp32 on CPU")
    wm("--tau", type=distance_threshold(), help="tau_d (default: the embedder's calibrated value; τ² triplets 0.4)")
    wm("--val-size", type=at_least(), help="with --wm: the first N triplets only")
    fg = p.add_argument_group("forgetting and the CPU experiment's report").add_argument
    fg("--forgetting", metavar="START", help="compare every --model with this model, their start")
    fg("--eta", type=positive(), default=1e-3, help="relative change that counts a weight as changed")
    fg("--prompts", default=GENERAL_PROMPTS, help="general prompts with reference answers (JSONL: prompt, answer)")
    fg("--report", metavar="RUN", help="write RUN/report.md and RUN/report.png from `make pipeline`'s runs")
    args = p.parse_args(argv)
    args.models = [(m.rpartition("=")[0] or m, m.rpartition("=")[2]) for m in args.model]  # [(name, path)]
    # --wm: tokens from the triplets (triplets.wm_budget); the agent's budget from the first model's template
    play_defaults(args, max_steps=30, tokens=not (args.wm or args.forgetting), model=(args.models or [[None]])[0][-1])
    args.splits = args.splits or (["test"] if args.env == "tau2" else ["valid_seen", "valid_unseen"])
    return args


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC: the held-out world-model scores, and Table 1's task success
# ---------------------------------------------------------------------------------------------
def evaluate_wm(args, model, tok, name, out, embed):
    """Held-out world-model quality: greedy predictions -> mean sim-to-real reward, similarity, format rate."""
    triplets = read_jsonl(args.wm, TRIPLET)[: args.val_size]
    tau = args.tau if args.tau is not None else default_tau(args.embedder, triplets)
    batch = args.batch_games or CPU_BATCH  # None: not sized by a plan (`plan_eval_batch`)
    max_new = args.max_new_tokens or wm_budget(tok, triplets)  # default: from the triplets, as train_wm.py
    outputs, recs = predict_and_score(model, tok, triplets, embed, tau, max_new, batch)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(
        out / "wm_predictions.jsonl",
        [dict(id=t.get("id"), output=o, next_state=t["next_state"], **r) for t, o, r in zip(triplets, outputs, recs)],
    )
    res = dict(name=name, tau=tau, embedder=args.embedder, max_new_tokens=max_new, **heldout_scores(triplets, recs))
    (out / "wm_results.json").write_text(json.dumps(res, indent=1))
    return res


def evaluate(args, model, tok, name, out, user=None):
    """Play every split (τ²: every domain's split) `args.runs` times with the model as policy (τ²: against the
    fixed `user`, the (model, tokenizer) of --user-model local:MODEL); return the results dict, with one entry
    per column of the table in results["splits"]."""
    out.mkdir(parents=True, exist_ok=True)
    results = dict(
        name=name, env=args.env, runs=args.runs, max_steps=args.max_steps, temperature=args.temperature, splits={}
    )
    if args.env == "tau2":
        from support.tau2_env import USER_TEMPERATURE, tau2_metrics

        results.update(user_model=args.user_model, user_temperature=USER_TEMPERATURE)
    metrics = [dict(run=r) for r in range(args.runs)]  # one line per run: <metric>/<column>
    columns = table_columns(args)
    for split, where in columns:
        games = column_games(args, where)
        if not games:
            continue  # --tasks names no task of this domain
        per_run = []
        for r in range(args.runs):
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
                plot=False,  # one figure for the model's runs (below), not one a run and split
                user=user,
            )
            per_run.append((rollouts, summary(rollouts)))
            metrics[r].update({f"{k}/{split}": v for k, v in per_run[-1][1].items()})
        types = sorted({x["task_type"] for x in per_run[0][0]})
        results["splits"][split] = dict(
            games=len(per_run[0][0]),
            **{
                k: [s[k] for _, s in per_run]
                for k in ("success", "invalid_rate", "mean_steps", "cut_turn_rate", "step_limit_rate")
            },
            per_task_type={
                t: [statistics.mean(x["won"] for x in ro if x["task_type"] == t) for ro, _ in per_run] for t in types
            },
        )
        if args.env == "tau2":  # τ²'s own metrics, and how every episode ended (per run)
            runs = [ro for ro, _ in per_run]
            ends = sorted({x["termination"] for ro in runs for x in ro})
            results["splits"][split].update(
                tau2=tau2_metrics(where["domain"][0], runs, name, args.user_model, args.max_steps),
                terminations={e: [sum(x["termination"] == e for x in ro) for ro in runs] for e in ends},
            )
    write_jsonl(out / "metrics.jsonl", metrics)
    plot_metrics(out / "metrics.jsonl", x="run")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


# ---------------------------------------------------------------------------------------------
# The command line: one of the measures above for every --model, then one table (TRY NOT TO MODIFY)
# ---------------------------------------------------------------------------------------------
def main(args):
    if args.report:
        from support.report import write_report  # the CPU experiment's tables and figure

        return write_report(Path(args.report))
    if args.calibrate:
        out = calibrate(read_jsonl(args.calibrate, TRIPLET), Embeddings(args.embedder, dtype=args.embed_dtype))
        for name, v in out.items():
            print(f"{name:>14} ({v['pairs']} pairs): d = 1 - cos quantiles 5/25/50/75/95% = {v['quantiles']}")
    elif args.score:
        rows = read_jsonl(args.score, PREDICTION)
        tau = args.tau if args.tau is not None else default_tau(args.embedder, rows)
        recs = sim_to_real(
            [r["output"] for r in rows],
            [r["next_state"] for r in rows],
            Embeddings(args.embedder, dtype=args.embed_dtype),
            tau,
            [r.get("kind") for r in rows],
        )
        print(json.dumps(mean_scores(recs)))
    else:  # every model in turn, then one table
        check_args(args)  # every model folder and the held-out file, before the first model loads
        if not args.forgetting:  # --batch-games for the card (--dry-run: the memory and time plans, then exit)
            args.batch_games = plan_eval_batch(args)
        elif args.dry_run:
            print(f"--dry-run: {len(args.models)} models, each beside {args.forgetting} in fp32: no batch to plan")
            raise SystemExit(0)
        claim_out(
            args.out,
            "evaluate --forgetting" if args.forgetting else "evaluate --wm" if args.wm else "evaluate",
            args.resume,
        )
        if args.forgetting:
            res = forgetting(args)
            (Path(args.out) / "forgetting.json").write_text(json.dumps(res, indent=1))
            groups = list(dict.fromkeys(MODULES.values()))  # the paper's order (Figure A1b)
            (Path(args.out) / "forgetting.md").write_text(forgetting_table(res, groups) + "\n")
            plot_weight_changes(res, Path(args.out) / "forgetting.png", groups)
            print(forgetting_table(res, groups))
            return print(
                "The paper's general benchmarks (Table 3; with network access, pip install evalscope):",
                *benchmark_commands(res, args.out),
                sep="\n",
            )
        embed = Embeddings(args.embedder, dtype=args.embed_dtype) if args.wm else None
        user = None
        if args.env == "tau2" and not args.wm:  # one fixed user for every row, loaded once
            from support.tau2_env import load_user

            user = load_user(args.user_model, args.dtype)
        results = []
        for name, path in args.models:
            model, tok = load_model(path, dtype=args.dtype)
            out = Path(args.out) / slug(name)
            results.append(
                evaluate_wm(args, model, tok, name, out, embed)
                if args.wm
                else evaluate(args, model, tok, name, out, user)
            )
            del model
        md = wm_table(results) if args.wm else table(results)
        (Path(args.out) / ("wm_table.md" if args.wm else "table.md")).write_text(md + "\n")
        print(md)
        for r in [] if args.wm else results:  # the agent's turns its token budget cut, a line a model over the bar
            cut = [x for s in r["splits"].values() for x in s["cut_turn_rate"]]
            if cut_warning(sum(cut) / len(cut), f"{r['name']}'s agent turns"):
                print(cut_warning(sum(cut) / len(cut), f"{r['name']}'s agent turns"))
        print(f"-> {args.out}/")


# ---------------------------------------------------------------------------------------------
# The harness: checks before the first model loads, the memory plan, the table's columns (TRY NOT TO MODIFY)
# ---------------------------------------------------------------------------------------------
def check_args(args):
    """Every model path exists (a missing folder says so now, not after the first model's run), the --wm
    triplets and the --forgetting prompts are well-formed records (support/schema.py) and --val-size fits."""
    for path in [p for _, p in args.models] + ([args.forgetting] if args.forgetting else []):
        check_model(path)
    held = read_jsonl(args.wm, TRIPLET) if args.wm else []
    if args.wm and args.val_size and args.val_size > len(held):
        fail(f"--val-size {args.val_size}: {args.wm} holds only {len(held)} triplets")
    if args.forgetting:
        read_jsonl(args.prompts, PROMPT)
    if args.env != "tau2" or args.wm or args.forgetting:
        return
    for split in args.splits:  # every named task is known, before the first model loads
        column_games(args, dict(split=split, domain=args.domain))


def plan_eval_batch(args):
    """--batch-games sized by the memory plan of the first --model (play.plan_batch): episodes of every split and
    run, or with --wm the held-out triplets (their longest prompt, the embedder counted)."""
    path = args.models[0][1]
    if not args.wm:
        games = sum(len(column_games(args, where)) for _, where in table_columns(args))  # what `evaluate` plays
        return plan_batch(args, path, games * args.runs * len(args.models))
    tok = load_tokenizer(path)
    triplets = read_jsonl(args.wm)[: args.val_size]
    prompt_len = max(len(tok(chat_prompt(tok, wm_prompt(t)), add_special_tokens=False)["input_ids"]) for t in triplets)
    new = args.max_new_tokens or wm_budget(tok, triplets)  # as `evaluate_wm`
    wm = dict(vars(args), max_steps=1, max_new_tokens=new, user_model="local")  # one prediction a triplet; no user
    return plan_batch(
        argparse.Namespace(**wm),
        path,
        len(triplets) * len(args.models),
        prompt_len,
        embedder_bytes(args.embedder, args.embed_dtype, [t["next_state"] for t in triplets], new),
    )


def table_columns(args):
    """[(column name, where)] of the table: each ALFWorld split, or each τ² domain (and split)."""
    if args.env == "alfworld":
        return [(s, dict(split=s)) for s in args.splits]
    return [
        (d if len(args.splits) == 1 else f"{d}/{s}", dict(split=s, domain=[d]))
        for d in args.domain
        for s in args.splits
    ]


def column_games(args, where):
    """The games of a table column: --games of an ALFWorld split, or of one τ² domain's split; --tasks: the
    named tasks of that domain only (each task is played in its own domain's column)."""
    if args.env != "tau2":
        return select_games(args.env, where["split"], args.games)
    if not args.tasks:
        return select_games(args.env, where["split"], args.games, where["domain"])
    named = select_games(args.env, where["split"], None, args.domain, args.tasks)
    return [t for t in named if t.split("/")[0] in where["domain"]][: args.games]


def lora(path):
    """The LoRA rank a checkpoint folder (`<run>/checkpoint/model`) was trained with, None for full fine-tuning
    or a folder that no stage of this project wrote."""
    trainer = Path(path).parent / "trainer.pt"
    return (
        torch.load(trainer, map_location="cpu", weights_only=False)["args"].get("lora_rank")
        if trainer.exists()
        else None
    )


if __name__ == "__main__":
    args = parse_args()  # Ctrl-C: one line, exit status 130; --resume keeps the episodes of a policy evaluation
    run_stage(main, args, resumable=not (args.wm or args.forgetting or args.report or args.calibrate or args.score))
