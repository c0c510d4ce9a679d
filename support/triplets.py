"""The world model's data, for train_wm.py and evaluate.py: which game a triplet comes from, the held-out split by
game, a prediction's token budget, and the checks of train_wm's flags against its triplets (before any model
loads)."""

import random

from support.checks import fail
from support.lm import load_tokenizer
from support.runs import read_jsonl
from support.schema import TRIPLET
from support.training import check_precision

# the think block's share of the default token budget: Qwen3-8B thinks on its own, the prompt asks every model to
THINK_TOKENS = 512


def game_of(triplet):
    """The game (τ²: task) a triplet comes from: its `game` field, else its id's "game#episode#turn" head."""
    return triplet.get("game") or triplet["id"].rsplit("#", 2)[0]


def heldout_split(triplets, frac, seed):
    """(train, held-out): the triplets of a fixed random share of the games (at least one) held out, the same for
    every mode and seed. By game: the episodes of a game start from the same reset, so a split by triplet would
    put identical triplets on both sides."""
    games = sorted({game_of(t) for t in triplets})
    held = set(random.Random(seed).sample(games, max(1, round(frac * len(games)))))
    return [t for t in triplets if game_of(t) not in held], [t for t in triplets if game_of(t) in held]


def wm_budget(tok, triplets):
    """The default token budget of a prediction: the longest real next state of `triplets`, in its tags, in tokens,
    and THINK_TOKENS for the think block (a budget cut before </next_state> scores 0: `truncated` counts them)."""
    texts = [f"<next_state>{t['next_state']}</next_state>" for t in triplets]
    return max(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]) + THINK_TOKENS


def check_wm_args(args, world, default_tau, filter_tau):
    """train_wm's flags checked against each other and against the data, before any model loads: (triplets, train
    triplets, held-out triplets). Unset, args.tau becomes `default_tau(embedder, triplets)`, args.filter_tau the
    environment's `filter_tau`, args.max_new_tokens `wm_budget`'s."""
    triplets = read_jsonl(args.triplets, TRIPLET)
    if not triplets:
        fail(f"{args.triplets} holds no triplets")
    if args.heldout and args.mode == "split":
        fail("--mode split makes the held-out share (--val-frac of the games): --heldout is for the other modes")
    if args.heldout:
        train, heldout = triplets, read_jsonl(args.heldout, TRIPLET)
        both = {game_of(t) for t in train} & {game_of(t) for t in heldout}
        if both:
            fail(f"{len(both)} games of --heldout {args.heldout} are also in --triplets, e.g. {min(both)}")
    else:
        train, heldout = heldout_split(triplets, args.val_frac, seed=0)
    if not train:
        games = len({game_of(t) for t in triplets})
        fail(f"--val-frac {args.val_frac} holds out all {games} games of {args.triplets}: none left to train on")
    if args.mode != "filter" and (args.val_size or 0) > len(heldout):
        has = (
            f"--heldout {args.heldout} holds {len(heldout)} triplets"
            if args.heldout
            else f"--val-frac {args.val_frac} holds out {len(heldout)} of the {len(triplets)} triplets"
        )
        fail(f"--val-size {args.val_size}: {has}; ask for at most {len(heldout)}, or leave --val-size out to score all")
    if args.mode in ("filter", "split") and world > 1:
        fail(f"--mode {args.mode} runs on one device: start it with python, not torchrun")
    if args.mode == "split":
        return triplets, train, heldout
    if args.mode != "filter":
        check_precision(args)  # no full fine-tuning in bf16
    args.tau = args.tau if args.tau is not None else default_tau(args.embedder, triplets)
    if args.filter_tau is None:  # paper Table A2: the filter's tau_d, by environment
        args.filter_tau = filter_tau[triplets[0].get("env", "alfworld")]
    if args.max_new_tokens is None:  # from the data: every real next state fits, with room to think
        args.max_new_tokens = wm_budget(load_tokenizer(args.model), train + heldout)
        print(f"--max-new-tokens {args.max_new_tokens}: the longest next state + {THINK_TOKENS} to think")
    return triplets, train, heldout
