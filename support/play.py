"""How episodes are played, stated once for the three stages that play them (collect.py, train_policy.py,
evaluate.py): the play flags, their defaults per environment, the `Play` settings the episode loop reads, and
the batch of episodes the memory plan fits (--max-memory-gb, --dry-run).

Each stage adds the flags with its own defaults (temperature: 1.0 to collect and in policy RL, 0.4 to evaluate;
--max-steps: 30 to collect and evaluate, 15 in policy RL, as the paper) and keeps its own flags beside them.
"""

import math
from dataclasses import dataclass, fields
from pathlib import Path

from support.checks import at_least, check_model, fail, non_negative, positive
from support.lm import TINY_MODEL, load_tokenizer, thinks
from support.memory import CPU_BATCH, helper_models, sampling_batch

TAU2_MAX_STEPS = 200  # tau2.config.DEFAULT_MAX_STEPS: τ²'s runs end after 200 orchestrator steps (every message)
# new tokens per agent turn: ALFWorld's think + action; τ²: room for Qwen3's own think block before its message
# (the share of turns cut at this limit is logged as cut_turn_rate: raise --max-new-tokens if it is not ~0)
AGENT_TOKENS = dict(alfworld=256, tau2=1024)
# what a template with a thinking switch (Qwen3) gets on top of AGENT_TOKENS with --thinking on: its own think block
THINKING_TOKENS = 1024


def add_play_args(p, temperature, batch_games):
    """The flags of how episodes are played (the fields of `Play`), with the stage's own defaults (--max-steps and
    --max-new-tokens: see `play_defaults`)."""
    g = p.add_argument_group("playing episodes (collect.py, train_policy.py, evaluate.py)")
    g.add_argument("--env", default="alfworld", choices=["alfworld", "tau2"], help="ALFWorld or τ²-bench")
    g.add_argument(
        "--max-steps",
        type=at_least(),
        default=None,
        help="ALFWorld: agent steps per episode (paper: 30 at evaluation, 15 in policy RL); τ²: orchestrator steps "
        f"(every agent, user and tool message), as τ² counts them (default: τ²'s own {TAU2_MAX_STEPS})",
    )
    g.add_argument(
        "--history", type=at_least(0), default=2, help="H: previous (observation, action) turns shown to the agent"
    )
    g.add_argument(
        "--temperature",
        type=non_negative("0 is greedy"),
        default=temperature,
        help="sampling temperature (paper: 1.0 for collection and policy RL)",
    )
    g.add_argument(
        "--max-new-tokens",
        type=at_least(),
        default=None,
        help=f"tokens the agent may write per turn, thinking included (default: {AGENT_TOKENS['alfworld']} ALFWorld, "
        f"{AGENT_TOKENS['tau2']} τ²; + {THINKING_TOKENS} for a model that thinks, see --thinking)",
    )
    g.add_argument(
        "--thinking",
        default="on",
        choices=["on", "off"],
        help="the agent's own thinking (the paper does not say): on, a model whose chat template has a thinking "
        "switch (Qwen3) thinks before it acts, with room for it in the default --max-new-tokens; off, the template's "
        "switch (enable_thinking=False) makes it act at once. Templates without one (Qwen2.5, SmolLM2): no change",
    )
    g.add_argument(
        "--batch-games",
        type=at_least(),
        default=batch_games,
        help="B: episodes played in parallel, one batched generate call per turn (collect, evaluate: 8 on CPU; with "
        "--max-memory-gb or on CUDA, as many as the memory plan fits)",
    )
    g.add_argument(
        "--domain",
        nargs="+",
        default=["retail", "telecom", "airline"],
        help="τ²-bench domains (retail, airline, telecom; mock: tau2's small test domain)",
    )
    g.add_argument(
        "--tasks", nargs="+", default=None, help="τ²: only these task ids (domain/id, or an id of the first --domain)"
    )
    g.add_argument(
        "--user-model",
        nargs="+",
        default=None,
        help="τ²'s user simulator, one fixed user: 'local:MODEL' (a local model, HF id or folder, loaded once, frozen, "
        "at τ²'s user temperature 0, thinking off) or a litellm model id, e.g. gpt-4.1, or openai/<name> with "
        "OPENAI_API_BASE=http://host:port/v1 for an OpenAI-compatible server (paper: Qwen3-235B-A22B-Instruct, and "
        "GPT-4.1 beside it to collect, C.1); collect.py takes several and plays episode e of a task with the "
        "(e mod U)-th (default: local: the base model, the one --model's checkpoints started from, never a trained "
        "checkpoint; `make pipeline` passes it)",
    )
    g.add_argument(
        "--self-user",
        action="store_true",
        help="τ²: self-play, the played model answers as its own user (a user that changes as the policy trains)",
    )
    g.add_argument(
        "--user-max-new-tokens", type=at_least(), default=256, help="τ²: tokens the user may write per message"
    )


def add_plan_args(p):
    """--max-memory-gb and --dry-run of the stages that only sample (collect.py, evaluate.py): the training scripts
    have theirs in training.add_grpo_args."""
    p.add_argument(
        "--max-memory-gb",
        type=positive(),
        default=None,
        help="memory of the device (default: the card's on CUDA): --batch-games as large as the memory plan fits",
    )
    p.add_argument("--dry-run", action="store_true", help="print the memory and time plans and exit")


def base_model(model):
    """The model a chain of runs started from: a checkpoint's trainer.pt beside checkpoint/model names its run's
    --model, followed back to a model no run of this project wrote (τ²'s default user: never a trained checkpoint)."""
    import torch

    seen = {model}
    while (Path(model).parent / "trainer.pt").is_file():
        state = torch.load(Path(model).parent / "trainer.pt", map_location="cpu", weights_only=False, mmap=True)
        model = state["args"]["model"]
        if model in seen:
            break
        seen.add(model)
    return model


def play_defaults(args, max_steps, tokens=True, model=None, several_users=False):
    """--max-steps and --max-new-tokens where not given: `max_steps` agent steps on ALFWorld, τ²'s own 200
    orchestrator steps; AGENT_TOKENS, + THINKING_TOKENS when `model` thinks under --thinking on (`tokens=False`:
    leave --max-new-tokens as given); τ²'s fixed user: local: the model the (first) --model started from (`base_model`)
    unless --user-model names one, or "self" under --self-user. `several_users`: the stage takes several
    --user-model (collect.py), kept in args.users; args.user_model is then the local one (for the memory plan)."""
    args.max_steps = args.max_steps or (TAU2_MAX_STEPS if args.env == "tau2" else max_steps)
    if args.env == "tau2":
        given = args.user_model or []
        if "local" in given or (args.self_user and given):
            fail("--user-model: name one fixed user (local:MODEL or a litellm id), or pass --self-user for self-play")
        first = args.model if isinstance(args.model, str) else args.model[0].rpartition("=")[2]
        if len(given) > 1 and not several_users:
            fail(f"--user-model: {len(given)} users; this stage plays against one fixed user (collect.py: several)")
        default = f"local:{base_model(first)}"
        if not given and not args.self_user and default != f"local:{first}":
            print(f"τ² user: {default} (the model --model's checkpoints started from; --user-model names another)")
        args.users = ["self"] if args.self_user else given or [default]
        args.user_model = next((u for u in args.users if u.startswith("local:")), args.users[0])
        for u in args.users:
            if u.startswith("local:"):
                check_model(u.removeprefix("local:"))
    if tokens and not args.max_new_tokens:
        thinks_here = args.thinking == "on" and model is not None and model_thinks(model)
        args.max_new_tokens = AGENT_TOKENS[args.env] + (THINKING_TOKENS if thinks_here else 0)
    return args


def model_thinks(model):
    """Whether `model`'s chat template has a thinking switch (support.lm.thinks); a model that does not load here
    says so later, in its own stage's one line."""
    try:
        return thinks(load_tokenizer(model))
    except (OSError, ValueError, SystemExit):
        return False


@dataclass
class Play:
    """How episodes are played: what the episode loop (collect.play) and the records need, and nothing else."""

    env: str = "alfworld"
    max_steps: int = 30
    history: int = 2  # H
    temperature: float = 1.0
    max_new_tokens: int = 256
    batch_games: int = 8
    seed: int = 0
    policy: str = "model"  # or "random": uniform over the admissible commands (ALFWorld)
    epsilon: float = 0.0  # with policy "model": probability of a random admissible command instead
    invalid_rate: float = 0.0  # with policy "random": probability of a command admissible earlier, not now
    thinking: str = "on"  # the agent's: "off" sets the chat template's switch (enable_thinking=False)
    model: str = TINY_MODEL  # the name the rollouts record
    user_model: str = ""  # τ²'s user simulator (play_defaults): "local:MODEL", a litellm id, or "self" (self-play)
    user_max_new_tokens: int = 256
    max_prompt_tokens: int = 0  # τ²: the longest agent prompt (the plan's); 0: the model's context


def play_settings(args, **override):
    """The `Play` settings of a script's flags (those it has), with `override` on top."""
    settings = Play(**{f.name: getattr(args, f.name) for f in fields(Play) if hasattr(args, f.name)} | override)
    settings.batch_games = settings.batch_games or CPU_BATCH  # None: not sized by a plan (`plan_batch`)
    return settings


def plan_batch(args, model, episodes, prompt_len=None, embedder=0):
    """--batch-games for `episodes` episodes of `model`: on CPU --batch-games (default 8); with a memory budget
    (--max-memory-gb, or the card on CUDA) as many as the memory plan fits (memory.sampling_batch). A turn is
    planned at prompt_len tokens (default: 1,536 ALFWorld; τ²: the real opening prompts + their growth, which
    also ends an episode whose prompt outgrows it: tau2_env.prompt_budget) + --max-new-tokens.
    --dry-run: the memory plan and the time plan (every episode to --max-steps: an upper bound), then exit."""
    if args.env == "tau2" and not prompt_len:
        from support.tau2_env import prompt_budget

        prompt_len = args.max_prompt_tokens = prompt_budget(model, args.domain, args.max_new_tokens)
    prompt_len = prompt_len or 1536
    new, steps = args.max_new_tokens, args.max_steps

    def work(mb, gb):
        calls = math.ceil(episodes / gb) * steps  # generate calls: a turn of up to gb episodes each
        context = prompt_len + new  # the KV cache a row is given (lm.sample allocates it whole)
        return {
            "episodes": dict(
                prefill=episodes * steps * prompt_len, steps=calls * new, rows=min(episodes, gb), context=context
            )
        }

    return sampling_batch(
        args.batch_games,
        model,
        args.dtype,
        prompt_len,
        new,
        args.max_memory_gb,
        args.dry_run,
        embedder=embedder,
        work=work,
        helpers=helper_models(args.env, args.user_model, None, args.dtype, prompt_len, args.user_max_new_tokens),
    )
