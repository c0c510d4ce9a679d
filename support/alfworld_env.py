"""ALFWorld through the package's own TextWorld env and wrappers: the game files of a split, a game's
env, its task type and the intro of its first observation (TRY NOT TO MODIFY)."""

import os
from copy import deepcopy
from functools import cache, lru_cache, partial, wraps
from itertools import zip_longest
from pathlib import Path

from support.checks import fail

SPLITS = ("train", "valid_seen", "valid_unseen")


def alfworld_data():
    """ALFWORLD_DATA, or ../shared/alfworld beside the project when unset; a one-line error if absent."""
    root = os.environ.get("ALFWORLD_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "alfworld")
    if not (Path(root) / "json_2.1.1").is_dir():
        fail(f"ALFWorld data not found: {root}/json_2.1.1 is missing (set ALFWORLD_DATA)")
    os.environ["ALFWORLD_DATA"] = root
    return Path(root)


def list_games(split, n=None):
    """The split's game files in a fixed order that takes the six task types in turn, the first n of them
    (so that a small subset covers every task type)."""
    if split not in SPLITS:
        fail(f"unknown ALFWorld split {split!r} (choose from {', '.join(SPLITS)})")
    root = alfworld_data()
    games = sorted(glob_games(root / "json_2.1.1" / split))
    if not games:
        fail(f"no games in {root}/json_2.1.1/{split}")
    by_type = {}
    for g in games:
        by_type.setdefault(task_type(g), []).append(g)
    in_turn = [g for row in zip_longest(*by_type.values()) for g in row if g]
    return in_turn[:n] if n else in_turn


def glob_games(folder):
    return [str(p) for p in Path(folder).glob("*/*/game.tw-pddl")]


def game_id(game_file):
    """A game's name in the records: its folder relative to ALFWORLD_DATA."""
    return str(Path(game_file).parent.relative_to(alfworld_data()))


def task_type(game_file):
    # the task folder is named "<task type>-<object>-...", e.g. pick_and_place_simple-Pencil-None-Shelf-308
    return Path(game_file).parent.parent.name.split("-")[0]


def make_env(game_file, max_steps, expert=False):
    """A TextWorld gym env for one game with ALFWorld's wrappers (admissible commands, `won`); with
    `expert`, info["extra.expert_plan"] holds the PDDL planner's next command (resets take seconds
    longer; ALFWorld's hand-coded expert loops on some games, the planner wins them)."""
    import textworld
    import textworld.gym
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredInfos

    reuse_translations()
    infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile", "expert_plan"] if expert else [])
    wrappers = [AlfredDemangler(shuffle=False), AlfredInfos] + (
        [partial(AlfredExpert, expert_type="planner")] if expert else []
    )
    return textworld.gym.make(
        textworld.gym.register_games([game_file], infos, max_episode_steps=max_steps, wrappers=wrappers)
    )


@cache
def reuse_translations():
    """TextWorld makes the same things from the same texts again and again; keep them in this process:
    - a game's PDDL in fast-downward's SAS format, translated four times a reset (twice for the state it loads,
      twice for the one it resets to; with and without the planner's optimisations), and only read: the last
      16 games';
    - TextWorld's tatsu parses of the same few hundred texts (the grammar's rules and the logic's queries), made
      at each reset and again for each observation written: each caller gets its own copy, as TextWorld writes
      into what it gets.
    The same observations and admissible commands (tests/test_collect.py); the time saved: docs/results.md."""
    import fast_downward
    import textworld.envs.pddl.textgen as textgen
    import textworld.logic as logic

    fast_downward.pddl2sas = lru_cache(maxsize=32)(fast_downward.pddl2sas)
    textgen._parse_and_convert = copied_from_cache(textgen._parse_and_convert)
    logic._parse_and_convert = copied_from_cache(logic._parse_and_convert)


def copied_from_cache(parse):
    """`parse` that remembers its results by their arguments and gives each caller a copy."""
    parsed = lru_cache(maxsize=4096)(parse)

    @wraps(parse)  # __wrapped__: parse itself
    def parse_again(*args, **kwargs):
        return deepcopy(parsed(*args, **kwargs))

    return parse_again


def split_intro(obs):
    """The first observation holds a banner, the room and the task: return (room, task)."""
    obs = obs.split("=-", 1)[-1].strip() if obs.startswith("-=") else obs.strip()
    room, _, task = obs.partition("Your task is to: ")
    return room.strip(), task.strip()
