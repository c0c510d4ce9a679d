"""The memory plan against measured peaks of the real tiny model, gradient checkpointing, --dry-run and
--max-memory-gb."""

import copy
import json

import pytest
import torch

from bench.memory_plan import PeakMemory, measure_sampling, measure_update
from conftest import run_script as run
from grpo import add_lora, collate, completion_logprobs
from support.lm import chat_prompt, checkpoint_activations
from support.memory import RATES, count_params, memory_budget, memory_plan, time_plan


def test_peak_tracker_counts_live_tensors_only():
    with PeakMemory() as m:
        a = torch.zeros(1000, 1000)  # 4 MB
        b = a * 2  # 4 MB more
        del b
        view = a.t()  # a view: no new storage
        assert m.now == 4_000_000 and view.shape == (1000, 1000)
    assert m.peak == 8_000_000


def test_parameter_counts_match_the_model(tiny):
    model = copy.deepcopy(tiny[0])
    n, n_lora = count_params(model.config, lora_rank=8)
    assert n == sum(p.numel() for p in model.parameters())
    assert n_lora == sum(p.numel() for p in add_lora(model, 8))


@pytest.mark.parametrize(
    "case",
    [
        dict(dtype="fp32", beta=0.001),  # full fine-tuning with the reference copy
        dict(dtype="bf16", lora_rank=8, beta=0.001, micro_batch=3),
        dict(dtype="fp32", lora_rank=8, grad_checkpointing=True, prompt_len=384),
    ],
)
def test_plan_matches_measured_peak_of_an_update(case):
    measured, planned, _ = measure_update(**case)
    assert 0.9 < planned / measured < 1.15, (planned, measured)


def test_plan_matches_measured_peak_of_sampling():
    measured, planned = measure_sampling(gen_batch=4, prompt_len=200, completion_len=16)
    assert 0.85 < planned / measured < 1.15, (planned, measured)


def test_plan_parts_follow_the_settings(tiny):
    config = tiny[0].config
    base = memory_plan(config, torch.bfloat16, micro_batch=2, seq_len=1024, completion_len=256)
    lora = memory_plan(config, torch.bfloat16, lora_rank=8, micro_batch=2, seq_len=1024, completion_len=256)
    ckpt = memory_plan(
        config, torch.bfloat16, lora_rank=8, grad_checkpointing=True, micro_batch=2, seq_len=1024, completion_len=256
    )
    assert lora["reference"] == 0 and base["reference"] == base["weights"]  # LoRA: the reference is adapters off
    assert lora["adam"] < base["adam"] / 10 and ckpt["activations"] < lora["activations"] / 5
    double = memory_plan(config, torch.bfloat16, micro_batch=4, seq_len=1024, completion_len=256)
    assert double["activations"] == 2 * base["activations"]


def test_grad_checkpointing_gives_the_same_gradients(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    add_lora(model, rank=4)
    for m in model.modules():
        if hasattr(m, "B"):
            torch.nn.init.normal_(m.B, std=0.01)  # non-zero B: gradients reach A too
    seqs = [
        (tok(chat_prompt(tok, "Name a fruit."))["input_ids"], tok(" apple pie")["input_ids"]),
        (tok(chat_prompt(tok, "Name a colour, please."))["input_ids"], tok(" red")["input_ids"]),
    ]
    ids, attn, P = collate(seqs, "cpu")
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            checkpoint_activations(model)
        model.train()
        model.zero_grad(set_to_none=True)
        (completion_logprobs(model, ids, attn, P)[0] * attn[:, P:]).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    assert any(g.abs().sum() > 0 for g in grads[0])


@pytest.fixture(scope="module")
def triplets(tmp_path_factory):
    """A few small triplets (the plan reads only their prompt lengths)."""
    path = tmp_path_factory.mktemp("plan") / "triplets.jsonl"
    rows = [
        dict(
            id=f"t{i}",
            task="put a mug in the sink",
            history=[],
            state="You are in the kitchen. " * 20,
            action="go to sink 1",
            next_state="You arrive at sink 1.",
        )
        for i in range(3)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dry_run_prints_the_plan_and_trains_nothing(triplets, tmp_path):
    r = run("train_wm.py", "--triplets", triplets, "--out", tmp_path / "out", "--lora-rank", "8", "--dry-run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "memory plan" in r.stdout and "LoRA r 8" in r.stdout and "peak" in r.stdout
    assert "time plan" in r.stdout and "planned at its longest" in r.stdout
    assert not (tmp_path / "out").exists()  # not claimed: no run.json, nothing written


def test_max_memory_shrinks_the_batches_then_refuses(triplets, tmp_path):
    args = ("--max-new-tokens", "256")  # the default (the longest next state + 512 to think) plans longer sequences
    r = run(
        "train_wm.py", "--triplets", str(triplets), "--out", str(tmp_path), "--dry-run", "--max-memory-gb", "4", *args
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "micro-batch 8 x" not in r.stdout and "micro-batch" in r.stdout  # 8 (the default) did not fit in 4 GB
    r = run("train_wm.py", "--triplets", str(triplets), "--out", str(tmp_path), "--dry-run", "--max-memory-gb", "0.5")
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error: the plan needs")


def test_a_model_that_cannot_be_read_is_a_one_line_error(triplets, tmp_path):
    r = run(
        "train_wm.py",
        "--triplets",
        str(triplets),
        "--out",
        str(tmp_path),
        "--model",
        str(tmp_path / "nothing"),
        "--dry-run",
    )
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: model folder {tmp_path / 'nothing'} does not exist"
    ]


def test_dry_run_prints_the_time_plan_and_counts_the_embedder(triplets, tmp_path):
    r = run("train_wm.py", "--triplets", str(triplets), "--out", str(tmp_path), "--dry-run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "embedder 0.09" in r.stdout  # all-MiniLM-L6-v2: 22.7M parameters in fp32
    assert "time plan (cpu rates" in r.stdout
    assert all(f"  {phase}: prefill" in r.stdout for phase in ("RWML sampling", "updates", "held-out scoring"))


def test_time_plan_is_tokens_over_the_rates(tiny):
    """prefill and train: tokens x parameters / rate; decode: steps x (weights + rows x context x KV bytes a token) /
    rate. The H200 row decodes faster than the H100's by their bandwidths, and prefills / trains alike."""
    config = tiny[0].config
    n = count_params(config)[0]
    kv = config.num_hidden_layers * 2 * config.num_key_value_heads * 64 * 4  # SmolLM2: head_dim 64, fp32
    work = {"a": dict(prefill=1000, steps=10, rows=2, context=100, train=300)}
    out, total = time_plan(config, torch.float32, work, kind="cpu", show=False)
    rate = RATES["cpu"]
    assert out["a"]["prefill"] == pytest.approx(1000 * n / rate["prefill"])
    assert out["a"]["decode"] == pytest.approx(10 * (4 * n + 2 * 100 * kv) / rate["decode"])
    assert out["a"]["train"] == pytest.approx(300 * n / rate["train"])
    assert total == pytest.approx(sum(out["a"].values()))
    h100, h200 = (time_plan(config, torch.float32, work, kind=k, show=False)[0]["a"] for k in ("H100", "H200"))
    assert h200["decode"] == pytest.approx(h100["decode"] * 3.35 / 4.8) and h200["prefill"] == h100["prefill"]


@pytest.mark.parametrize("script", ["collect.py", "evaluate.py"])
def test_sampling_stages_size_their_batch_by_the_memory_budget(script, tiny):
    """--max-memory-gb stands in for a card: a sampling-only stage (collection, evaluation) runs as many episodes at
    once as the plan fits (weights + KV cache + prefill of 1,536 + 256 tokens a row), halved from 512; on CPU without
    a budget, 8; a given --batch-games is kept when it fits."""
    assert memory_budget(None) == float("inf") and memory_budget(3) == 3e9  # CPU: no card
    config = tiny[0].config
    fits = lambda b: memory_plan(config, torch.float32, training=False, gen_batch=b, seq_len=1792, completion_len=256)
    assert fits(16)["peak"] < 3e9 < fits(32)["peak"]
    base = [script, "--games", "2", "--dry-run"]
    for flags, batch in (([], 8), (["--max-memory-gb", "3"], 16), (["--max-memory-gb", "3", "--batch-games", "4"], 4)):
        r = run(*base, *flags)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"sampling only; sampling {batch} x 1536 + 256)" in r.stdout, r.stdout
        assert "time plan (cpu rates" in r.stdout and "  episodes: prefill" in r.stdout
