"""The sim-to-real gap reward with the real MiniLM embedder, and the ROUGE reward."""

import pytest
import torch

from bench.memory_plan import PeakMemory
from reward import (
    JUDGE_REPLY,
    Embeddings,
    calibrate,
    default_tau,
    embedder_bytes,
    judge,
    mean_scores,
    parse_next_state,
    rouge_reward,
    sim_to_real,
    wm_prompt,
)

REAL = "You open the fridge 1. The fridge 1 is open. In it, you see a apple 1, a egg 2, and a lettuce 1."


@pytest.fixture(scope="module")
def embed():
    return Embeddings()


def test_parse_next_state():
    assert parse_next_state("<think>hm</think><next_state> You see a mug. </next_state>") == "You see a mug."
    assert parse_next_state("<next_state>a</next_state> then <next_state>b</next_state>") == "b"
    assert parse_next_state("You see a mug.") is None
    assert parse_next_state("<next_state>You see a mug.") is None


def test_identical_next_state_scores_1_unrelated_0_missing_tags_0(embed):
    """A prediction identical to the real next state scores 1, an unrelated one 0, and one without <next_state>
    tags 0 (no similarity)."""
    outputs = [
        f"<think>opening it</think><next_state>{REAL}</next_state>",
        "<think>?</think><next_state>The stock market closed higher on Tuesday.</next_state>",
        REAL,
    ]  # right text but no tags
    recs = sim_to_real(outputs, [REAL] * 3, embed, tau=0.2)
    assert [r["reward"] for r in recs] == [1.0, 0.0, 0.0]
    assert recs[0]["similarity"] == pytest.approx(1.0, abs=1e-5) and recs[1]["similarity"] < 0.3
    assert recs[2] == dict(reward=0.0, similarity=None, format=False, exact=False)  # exact needs the tags too
    assert mean_scores(recs)["format"] == pytest.approx(2 / 3)


def test_threshold_is_on_the_distance(embed):
    """The reward is 1 exactly when the distance 1 - cos is below tau_d: just above the distance it is 1, just
    below 0."""
    close = (
        "<next_state>You open the fridge 1. The fridge 1 is open. In it, you see a apple 1 and a egg 2.</next_state>"
    )
    d = 1 - sim_to_real([close], [REAL], embed, tau=0.2)[0]["similarity"]
    assert 0 < d < 0.2
    assert sim_to_real([close], [REAL], embed, tau=d + 1e-3)[0]["reward"] == 1.0
    assert sim_to_real([close], [REAL], embed, tau=d - 1e-3)[0]["reward"] == 0.0


def test_tau2s_tau_d_warns_when_the_embedder_is_not_the_one_it_was_calibrated_for(capsys):
    tau2 = [dict(env="tau2")]
    assert default_tau("all-minilm-l6-v2", tau2) == 0.4
    assert capsys.readouterr().out.startswith("warning: tau_d 0.4 for τ² was calibrated for Qwen/Qwen3-Embedding-8B")
    assert default_tau("Qwen/Qwen3-Embedding-8B", tau2) == 0.4 and default_tau("all-minilm-l6-v2", [{}]) == 0.2
    assert capsys.readouterr().out == ""


def test_real_next_states_are_embedded_once_and_predictions_not_kept(embed):
    """G predictions of one triplet embed its real next state once (the cache), and no prediction is cached."""
    embed.cache.clear()
    recs = sim_to_real([f"<next_state>x{i}</next_state>" for i in range(5)], [REAL] * 5, embed, tau=0.2)
    assert list(embed.cache) == [REAL] and len(recs) == 5


def test_rouge_is_rounded_to_fifths():
    """The ROUGE-L F1 reward is 1 for the same text, 0 for none, and rounded to a multiple of 0.2 with halves
    up."""
    masked = '{"order_id": "string", "status": "string", "items": [{"price": "number"}]}'
    assert rouge_reward(masked, masked) == 1.0
    assert rouge_reward(None, masked) == 0.0
    r = rouge_reward('{"order_id": "string"}', masked)
    assert 0 < r < 1 and round(r * 5, 6) == round(r * 5)
    # the five ties, F1 = 2 LCS / (len(prediction) + len(reference)) = 0.1, 0.3, 0.5, 0.7, 0.9, round half up
    words = [f"w{i}" for i in range(10)]
    ties = [(1, 19), (3, 17), (1, 3), (7, 13), (9, 11)]  # (LCS = prediction length, reference length)
    scores = [rouge_reward(" ".join(words[:k]), " ".join(words[:k] + ["x"] * (n - k))) for k, n in ties]
    assert scores == [0.2, 0.4, 0.6, 0.8, 1.0]


def test_calibration_separates_near_and_random_pairs(embed):
    triplets = [
        dict(game="g", action=a, next_state=s)
        for a, s in [
            ("go to drawer 1", "You arrive at loc 6. The drawer 1 is closed."),
            ("go to drawer 2", "You arrive at loc 7. The drawer 2 is closed."),
            ("open fridge 1", REAL),
            ("take mug 1 from desk 1", "You pick up the mug 1 from the desk 1."),
            ("go to shelf 2", "You arrive at loc 3. On the shelf 2, you see a vase 2."),
            ("look", "Nothing happens."),
        ]
    ]
    out = calibrate(triplets, embed, pairs=50)
    assert out["same template"]["quantiles"][2] < out["random"]["quantiles"][2]


def test_wm_prompt_holds_task_history_state_and_action():
    p = wm_prompt(
        dict(
            task="put a mug in the fridge.",
            history=[["You are in a room.", "go to desk 1"]],
            state="On the desk 1, you see a mug 1.",
            action="take mug 1 from desk 1",
        )
    )
    for part in (
        "put a mug in the fridge.",
        "You are in a room.",
        "go to desk 1",
        "On the desk 1, you see a mug 1.",
        "take mug 1 from desk 1",
        "<next_state>",
    ):
        assert part in p


def test_llm_judge_reward_with_the_tiny_model_as_judge(tiny):
    """Table A8's prompt (state, action, prediction, real observation; JSON with analysis and score), answered by a
    real model; the verdict's last score is the reward: real-valued in [0, 1], or 0/1 for the binary variant."""
    from support.lm import chat_prompt, generate

    model, tok = tiny
    seen = []
    ask = lambda prompts: (
        seen.extend(prompts)
        or generate(model, tok, [chat_prompt(tok, p) + JUDGE_REPLY for p in prompts], 24, temperature=0)
    )
    outputs = [f"<next_state>{REAL}</next_state>", "no tags"]
    triplet = dict(task="put a mug in the desk", history=[], state="You are in the middle of a room.", action="look")
    triplet["next_state"] = REAL
    real, binary = judge(outputs, [triplet] * 2, ask), judge(outputs, [triplet] * 2, ask, binary=True)
    assert 0 <= real[0] <= 1 and binary[0] in (0.0, 1.0) and real[1] == binary[1] == 0.0
    assert len(seen) == 2  # one verdict per tagged prediction: the untagged one is 0 without asking
    for part in ("# Current state", "put a mug in the desk", "look", f"follows:\n{REAL}", '"score": 0.0 or 1.0'):
        assert part in seen[1]
    assert '"score": a number between 0.0 and 1.0' in seen[0] and "0.0 or 1.0" not in seen[0]
    # a verdict continues the prefilled JSON (or holds it whole); its last score, clipped to [0, 1], is the reward
    verdicts = [
        'x", "score": 0.4}\n</json>',
        '<json>{"analysis": "y", "score": 1.0}</json>',
        "no score",
        '", "score": 7',
    ]
    graded = lambda binary: judge(["<next_state>x</next_state>"] * 4, [triplet] * 4, lambda ps: verdicts, binary)
    assert graded(False) == [0.4, 1.0, 0.0, 1.0] and graded(True) == [0.0, 1.0, 0.0, 1.0]


def test_exact_is_the_real_next_state_up_to_whitespace(embed):
    """`exact` is true when the tagged prediction is the real next state up to whitespace, false otherwise or
    without tags."""
    outputs = [
        f"<next_state>{REAL}</next_state>",
        f"<next_state> {REAL.replace(' ', '  ')}\n</next_state>",
        f"<next_state>{REAL[:-1]}</next_state>",
        REAL,
    ]
    assert [r["exact"] for r in sim_to_real(outputs, [REAL] * 4, embed, tau=0.2)] == [True, True, False, False]


@pytest.mark.parametrize("words", [100, 400])
def test_the_plan_holds_what_a_batch_of_embeddings_holds(embed, words):
    """One `Embeddings.encode` batch of 64 texts, measured (every live tensor it creates), against the plan's
    (reward.embedder_bytes): 64 x the longest text's tokens x (3 h + 2 I) fp32 values for MiniLM's BERT layers,
    the texts cut at its max_seq_length of 256 tokens (400 words are planned as 256 tokens, not 402)."""
    texts = [" ".join(["kitchen"] * (words - 2 + i % 3)) for i in range(64)]
    with PeakMemory() as m:
        embed.encode(texts)
    planned = embedder_bytes(texts=texts)[1]
    assert 0.95 < m.peak / planned < 1.05, (m.peak, planned)
    assert embedder_bytes(new_tokens=30)[1] == 64 * 30 * (3 * 384 + 2 * 1536) * 4  # predictions of 30 tokens alone


def test_the_embedder_is_fp32_on_cpu_and_the_plan_counts_its_bytes(embed):
    """--embed-dtype auto: fp32 on CPU (bf16 on CUDA); the memory plan's `embedder` is its weights' bytes, from
    the config alone; evaluate.py and train_wm.py both take the flag."""
    from evaluate import parse_args as evaluate_args
    from train_wm import parse_args as train_wm_args

    weights = list(embed.model.parameters())
    assert {w.dtype for w in weights} == {torch.float32}
    n = sum(w.numel() for w in weights)
    assert embedder_bytes()[0] == 4 * n and embedder_bytes(dtype="bf16")[0] == 2 * n
    assert evaluate_args(["--embed-dtype", "bf16"]).embed_dtype == "bf16" and evaluate_args([]).embed_dtype == "auto"
    assert train_wm_args(["--triplets", "T"]).embed_dtype == "auto"
