"""The records the stages exchange, stated once: each JSONL kind as {field: type}, the fields it must have,
those it may have, and the field whose values are unique in a file. `runs.read_jsonl(path, schema)` checks
every line against it before a stage uses the file (docs/files.md lists the same tables):

    error: runs/collect/triplets.jsonl:7: `next_state` must be non-empty text, got ""

Types: "text" a string with more than white space, "str" any string, "str|null", "int", "number" (int or
float), "number|null", "bool", "pairs" a list of [string, string] (a triplet's history of [observation,
action]), "turns" a list of objects of the TURN schema, "object" a JSON object, "list" a JSON list.
"""

import json
from collections import namedtuple

# required: {field: type} every record has; optional: {field: type} checked when present; other: the type of
# every field named in neither (None: anything); unique: a field no two records of a file share (or None)
Schema = namedtuple("Schema", "name required optional other unique", defaults=({}, None, None))

TURN = Schema(  # one agent turn of a rollout (ALFWorld's have an observation, τ²'s do not)
    "turn",
    required=dict(action="str", valid="bool"),
    optional=dict(observation="text", output="str|null", behaviour="str"),
)

ROLLOUT = Schema(  # collect.py's and evaluate.py's rollouts.jsonl: one episode a line
    "rollout",
    required=dict(
        env="str",
        game="text",
        split="str",
        task_type="str",
        task="str",
        episode="int",
        won="bool",
        steps="int",
        invalid="int",
        turns="turns",
        policy="str",
        epsilon="number",
        model="str|null",
        seed="int",
    ),
    optional=dict(
        final_observation="text",
        invalid_rate="number",
        step="int",
        reward="number|null",
        termination="str|null",
        reward_info="object|null",
        messages="list",
        user_model="str",
    ),
)

TRIPLET = Schema(  # triplets.jsonl, triplets.filtered.jsonl, heldout.jsonl, the filter's scored.jsonl
    "triplet",
    required=dict(id="text", task="str", history="pairs", state="text", action="str", next_state="text"),
    optional=dict(env="str", game="text", valid="bool", kind="str", filter_reward="number"),
    unique="id",
)

PREDICTION = Schema(  # evaluate.py --score's input (wm_predictions.jsonl has these fields)
    "prediction", required=dict(output="str", next_state="text"), optional=dict(kind="str")
)

PROMPT = Schema(  # data/general_prompts.jsonl, evaluate.py --forgetting --prompts
    "general prompt", required=dict(prompt="text", answer="text")
)

STEP_LOG = Schema("step line", required=dict(step="int"))  # a JSONL of per-step lines a resumed run cuts at its step

METRICS = Schema(  # metrics.jsonl of collect.py and train_wm.py, which support/report.py reads: numbers, and the
    "metrics line",
    required=dict(step="int"),
    optional=dict(model="str"),
    other="number|null",  # filter's model
)


def _pairs(v):
    return isinstance(v, list) and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in v
    )


CHECKS = {  # type -> (test, what a wrong value should have been)
    "text": (lambda v: isinstance(v, str) and v.strip() != "", "non-empty text"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "str|null": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "number|null": (lambda v: v is None or isinstance(v, (int, float)), "a number or null"),  # bools count: 0 / 1
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "pairs": (_pairs, "a list of [observation, action] string pairs"),
    "turns": (lambda v: isinstance(v, list) and all(isinstance(t, dict) for t in v), "a list of turn objects"),
    "object|null": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "list": (lambda v: isinstance(v, list), "a list"),
}


def shown(value, limit=40):
    """A value as JSON, shortened for an error line."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def problem(row, schema, required=()):
    """What is wrong with one record (a string for the error line), or None. `required`: optional fields
    of the schema that this reader needs."""
    for field in [*schema.required, *required]:
        if field not in row:
            if schema is TRIPLET and problem(row, ROLLOUT) is None:
                return "a rollout (one episode), not a triplet: pass the triplets.jsonl written beside rollouts.jsonl"
            return f"missing field {field!r}"
    for field, value in row.items():
        kind = schema.required.get(field) or schema.optional.get(field) or schema.other
        if kind is None:
            continue
        ok, want = CHECKS[kind]
        if not ok(value):
            return f"`{field}` must be {want}, got {shown(value)}"
        if kind == "turns":
            for i, turn in enumerate(value):
                wrong = problem(turn, TURN)
                if wrong:
                    return f"turn {i}: {wrong}"
    return None
