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
from support.memory import count_params, memory_plan


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
    r = run("train_wm.py", "--triplets", str(triplets), "--out", str(tmp_path), "--lora-rank", "8", "--dry-run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "memory plan" in r.stdout and "LoRA r 8" in r.stdout and "peak" in r.stdout
    assert not (tmp_path / "metrics.jsonl").exists()


def test_max_memory_shrinks_the_batches_then_refuses(triplets, tmp_path):
    r = run("train_wm.py", "--triplets", str(triplets), "--out", str(tmp_path), "--dry-run", "--max-memory-gb", "4")
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
