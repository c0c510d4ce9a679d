"""One episode being played: the record that ALFWorld's loop (collect.py) and τ²-bench's (support/tau2_env.py) fill
turn by turn, and the statistics of finished episodes that every stage logs."""

import random
from dataclasses import dataclass, field


@dataclass
class Episode:
    game: str
    split: str
    index: int  # episode number of this game
    rng: random.Random
    env: object = None
    task: str = ""
    observation: str = ""
    admissible: list = field(default_factory=list)
    commands: dict = field(default_factory=dict)  # ALFWorld: commands admissible so far (random invalid actions)
    turns: list = field(default_factory=list)
    seqs: list = field(
        default_factory=list
    )  # per turn: (prompt_ids, completion_ids) the model wrote, None for a random turn
    won: bool = False
    done: bool = False
    job: int = 0  # its position in the jobs played (episodes finish out of order)
    cut: int = 0  # model turns cut by the token limit (--max-new-tokens)


def summary(rollouts):
    """Success rate, invalid-action rate (per turn) and mean episode length of rollout records; the shares of
    turns cut by the token limit and of episodes ended by the step limit (ALFWorld: every one not won); τ²: the
    agent's replies with tool calls, and how many of them wrote text beside their calls or made several."""
    n = max(1, len(rollouts))
    turns = max(1, sum(r["steps"] for r in rollouts))
    tau2 = rollouts and all("call_turns" in r for r in rollouts)
    calls = {k: sum(r[k] for r in rollouts) for k in ("call_turns", "calls_with_text", "multi_call_turns") if tau2}
    return calls | dict(
        success=sum(r["won"] for r in rollouts) / n,
        invalid_rate=sum(r["invalid"] for r in rollouts) / turns,
        mean_steps=sum(r["steps"] for r in rollouts) / n,
        cut_turn_rate=sum(r.get("cut_turns", 0) for r in rollouts) / turns,
        step_limit_rate=sum(r.get("termination", "won" if r["won"] else "max_steps") == "max_steps" for r in rollouts)
        / n,
    )
