"""The memory plan against measured peaks of the real tiny model, gradient checkpointing, --dry-run and
--max-memory-gb."""

import copy
import json

import pytest
import torch

from bench.memory_plan import PeakMemory, measure_sampling, measure_update
from conftest import run_script as run
from grpo import collate, completion_logprobs
from support.lm import chat_prompt, checkpoint_activations
from support.lora import add_lora
from support.memory import RATES, count_params, fit_memory, memory_budget, memory_plan, time_plan


def test_peak_tracker_counts_live_tensors_only():
    with PeakMemory() as m:
        a = torch.zeros(1000, 1000)  # 4 MB
        b = a * 2  # 4 MB more
        del b
        view = a.t()  # a view: no new storage
        assert m.now == 4_000_000 and view.shape == (1000, 1000)
    assert m.peak == 8_000_000


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_log_probs_hold_the_planned_bytes_a_logit_and_autograds_gradients(tiny, dtype):
    """The per-token log-probabilities of an update (grpo.completion_logprobs, lm.TokenLogProbs) hold the model's
    logits and one fp32 table at their peak, forward and backward: the plan's B + 4 bytes a logit (B: the
    weights' bytes), where autograd's gather - logsumexp holds ~16; and their values and gradients are those of
    gather - logsumexp."""
    model = copy.deepcopy(tiny[0]).to(dtype)
    model.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)  # the backward runs through the lm_head, as in an update
    seqs = [(list(range(100, 110)), list(range(200, 264)))] * 2
    ids, attn, P = collate(seqs, "cpu")
    logits = 2 * (64 + 1) * model.config.vocab_size
    with PeakMemory() as m:
        logp = completion_logprobs(model, ids, attn, P)[0]
        (logp * torch.tensor([[0.5], [-1.0]])).sum().backward()
    planned = logits * (dtype.itemsize + 4)
    assert 0.95 <= m.peak / planned <= 1.05, m.peak / logits
    if dtype == torch.bfloat16:
        return  # (bf16 matmuls are slow on CPUs without AMX: the values are compared in fp32)
    grad = model.model.norm.weight.grad.clone()
    model.model.norm.weight.grad = None
    full = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0))
    table = full.logits[:, P - 1 : -1].float()
    reference = table.gather(-1, ids[:, P:, None]).squeeze(-1) - table.logsumexp(-1)
    (reference * torch.tensor([[0.5], [-1.0]])).sum().backward()
    assert torch.equal(logp.detach(), reference.detach()) and torch.equal(grad, model.model.norm.weight.grad)


def test_parameter_counts_match_the_model(tiny):
    model = copy.deepcopy(tiny[0])
    n, n_lora = count_params(model.config, lora_rank=8)
    assert n == sum(p.numel() for p in model.parameters())
    assert n_lora == sum(p.numel() for p in add_lora(model, 8))


@pytest.mark.parametrize(
    "case",
    [
        dict(dtype="fp32", beta=0.001),  # full fine-tuning with the reference copy
        # bf16 with short sequences: a CPU without native bf16 kernels (AVX2 only) multiplies bf16 slowly, and 96
        # tokens a sequence still hold every part of the plan (weights, adapters, activations, logits)
        dict(dtype="bf16", lora_rank=8, beta=0.001, micro_batch=3, prompt_len=64, completion_len=32),
        dict(dtype="fp32", lora_rank=8, grad_checkpointing=True, prompt_len=256),  # 1.02 (384 tokens: 2x the time)
    ],
)
def test_plan_matches_measured_peak_of_an_update(case):
    measured, planned, _ = measure_update(**case)
    assert 0.9 < planned / measured < 1.15, (planned, measured)


def test_plan_matches_measured_peak_of_sampling():
    measured, planned = measure_sampling(gen_batch=4, prompt_len=200, completion_len=16)
    assert 0.85 < planned / measured < 1.15, (planned, measured)


def test_sampling_with_lora_holds_the_adapters_and_nothing_more():
    """RWML and Policy RL sample with the LoRA adapters folded into the weights (lora.adapters_merged): a bf16
    sampling call's peak, the merge included, is the plain model's plus the adapters' fp32 A and B (the plan's
    `adapters`). Sampling through the adapters (their fp32 B A x, [prompt tokens, 1,536] on the MLP's gate and
    up: the prefill's largest tensors) would hold ~2x the adapters more."""
    plain = measure_sampling(gen_batch=8, prompt_len=256, completion_len=4, dtype="bf16")
    lora = measure_sampling(gen_batch=8, prompt_len=256, completion_len=4, dtype="bf16", lora_rank=8)
    assert 0.98 < lora[1] / lora[0] < 1.02, lora
    assert abs((lora[0] - plain[0]) - (lora[1] - plain[1])) < 0.05 * (lora[1] - plain[1]), (plain, lora)


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


def test_a_large_card_raises_the_micro_batch_unless_it_is_given(triplets, tmp_path, tiny):
    """--micro-batch not given, with a budget (a card, --max-memory-gb): doubled from 8 while the plan fits, up to
    an update's sequences (RWML: --batch-size x G = 32); given, it is only ever lowered. At a budget between the
    plans of 16 and 32 sequences a pass, 16."""
    common = ("train_wm.py", "--triplets", triplets, "--out", tmp_path, "--dry-run", "--max-new-tokens", "64")
    common += ("--batch-size", "8", "--group-size", "4", "--max-memory-gb", "1000")
    assert "micro-batch 32 x" in run(*common).stdout
    assert "micro-batch 8 x" in run(*common, "--micro-batch", "8").stdout
    plan = lambda mb: memory_plan(tiny[0].config, torch.float32, 0, False, False, mb, 150, 50, 64, 100)["peak"]
    between = (plan(16) + plan(32)) / 2 / 1e9
    fit = lambda **kw: fit_memory("smollm2-135m", "fp32", 0, False, False, 8, 64, 100, 50, max_memory_gb=between, **kw)
    assert fit(grow_to=1024) == (16, 64) and fit() == (8, 64) and fit(grow_to=8) == (8, 64)


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
    # one batch it embeds (reward.embedder_bytes): 64 texts cut at MiniLM's 256 tokens (predictions may run to
    # --max-new-tokens, here the longest next state + 512) x (3 h + 2 I) fp32 values
    assert f"  embedding {64 * 256 * (3 * 384 + 2 * 1536) * 4 / 1e9:.2f}" in r.stdout
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


def tiny_moe(**kw):
    """A random-init Qwen3-MoE config at toy width (the architecture of the paper's Qwen3-30B-A3B)."""
    from transformers import AutoConfig

    fields = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8)
    fields.update(num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    fields.update(head_dim=16, vocab_size=512)
    return AutoConfig.for_model("qwen3_moe", **{**fields, **kw})


def test_a_group_is_prefilled_once_in_the_plan_as_in_sample(tiny, tmp_path):
    """lm.sample prefills each distinct prompt once: 4 prompts x G 4 are planned (and measured) as 4 prefills and
    16 rows of KV cache, and fit_memory fits a G-shared batch that many times larger than one of distinct prompts."""
    from transformers import AutoConfig

    from bench.memory_plan import PAPER_MODELS, measure_sample_call
    from support.memory import distinct_prompts, fit_memory

    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    g = torch.Generator().manual_seed(0)
    prompts = [tok.decode(torch.randint(100, 40000, (200,), generator=g)) for _ in range(4)]
    measured, planned, _ = measure_sample_call(model, tok, prompts, 16, n=4)
    assert 0.85 < planned / measured < 1.15, (planned, measured)
    assert [distinct_prompts(r, 8) for r in (256, 64, 8, 4, 6, 12)] == [32, 8, 1, 1, 2, 2]
    kind, fields = PAPER_MODELS["Qwen/Qwen2.5-7B-Instruct"]  # its config alone: the plan loads no weights
    AutoConfig.for_model(kind, **fields).save_pretrained(tmp_path)
    alone, shared = (
        fit_memory(str(tmp_path), "bf16", 0, False, False, 1, 512, 1536, 256, max_memory_gb=72, training=False, group=g)
        for g in (1, 8)
    )
    assert (alone[1], shared[1]) == (128, 256)  # a batch of 8-row groups prefills 1/8 of its rows: twice the rows


def test_the_plan_holds_every_model_that_loads_and_ddps_buckets(tiny, capsys):
    """The judge and a fixed τ² user: their weights for the whole run and their own sampling phase; DDP's gradient
    buckets (as large as the trainable gradients) under torchrun without FSDP. A run whose models do not fit
    stops in one line that names them."""
    from support.memory import fit_memory, helper_models

    config = tiny[0].config
    helpers = {"judge": (config, torch.float32, 900, 8)}
    base = memory_plan(config, torch.float32, micro_batch=2, seq_len=1024, completion_len=256, gen_batch=16)
    more = memory_plan(config, torch.float32, micro_batch=2, seq_len=1024, completion_len=256, gen_batch=16,
                       helpers=helpers, ddp=True)  # fmt: skip
    assert more["judge"] == base["weights"] and more["ddp_buckets"] == base["grads"]
    assert more["peak"] >= base["peak"] + more["judge"] + more["ddp_buckets"]
    assert helper_models("alfworld", "local:smollm2-135m") == {}  # no τ² user on ALFWorld
    assert helper_models("tau2", "local", None) == {} and "τ² user" in helper_models("tau2", "local:smollm2-135m")
    user = helper_models("tau2", "local:smollm2-135m", "smollm2-135m", "fp32", 1536, 256, judge_tokens=128)
    assert set(user) == {"τ² user", "judge"} and user["judge"][2:] == (1792, 128)
    with pytest.raises(SystemExit) as e:
        fit_memory("smollm2-135m", "fp32", 0, False, False, 1, 1, 512, 64, max_memory_gb=0.8, training=False,
                   helpers=user)  # fmt: skip
    assert "judge 0.5" in str(e.value) and "τ² user 0.5" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("script", ["train_wm.py", "collect.py"])
def test_the_stages_plan_the_judge_and_the_tau2_user(script, triplets, tmp_path):
    argv = (
        ["--triplets", str(triplets), "--reward", "judge", "--out", str(tmp_path)]
        if script == "train_wm.py"
        else ["--env", "tau2", "--domain", "retail", "--games", "1", "--user-model", "local:smollm2-135m"]
    )
    r = run(script, *argv, "--dry-run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("judge 0.54" if script == "train_wm.py" else "τ² user 0.54") in r.stdout, r.stdout


def test_compiled_decoding_and_its_copies_are_in_the_plan(tiny):
    """The compiled path (opt-in) attends over its static cache, rounded up to lm.CACHE_BLOCK tokens, and repeats
    K and V to the query heads' width: the plan holds one layer's copy, and a step reads the copy besides the cache
    (Qwen2.5-7B at 64 rows x 1,664 tokens: ~21 GB eager, ~114 GB compiled)."""
    from transformers import AutoConfig

    from bench.memory_plan import PAPER_MODELS
    from support.memory import decode_bytes

    config = tiny[0].config  # 9 query heads on 3 key/value heads of 64
    eager = memory_plan(config, torch.float32, gen_batch=4, seq_len=300, completion_len=100, training=False)
    compiled = memory_plan(config, torch.float32, gen_batch=4, seq_len=300, completion_len=100, training=False,
                           compiled=True)  # fmt: skip
    assert compiled["kv_cache"] == eager["kv_cache"] * 512 // 300 and compiled["kv_repeat"] == 4 * 512 * 2 * 576 * 4
    kind, fields = PAPER_MODELS["Qwen/Qwen2.5-7B-Instruct"]
    q7 = AutoConfig.for_model(kind, **fields)
    assert decode_bytes(q7, torch.bfloat16, 64, 1664) == pytest.approx(21.3e9, rel=0.01)
    assert decode_bytes(q7, torch.bfloat16, 64, 1664, "compiled") == pytest.approx(113.9e9, rel=0.01)


def test_the_time_plan_counts_active_parameters_and_fp32_as_tf32(tiny):
    """A mixture-of-experts token runs top-k of its experts: prefill and training count active parameters. fp32
    weights on a GPU compute in TF32, at half of the measured bf16 rates; on CPU the rates are fp32's own."""
    from support.memory import active_params, count_params, decode_bytes

    moe = tiny_moe()
    n, experts = count_params(moe)[0], 2 * 8 * 3 * 32 * 64  # 2 layers x 8 experts x (gate, up, down) of 32 x 64
    assert active_params(moe) == n - experts + experts * 2 // 8
    work = {"a": dict(prefill=1000, train=300, steps=4, rows=2, context=64)}
    out = time_plan(moe, torch.bfloat16, work, kind="H100", show=False)[0]["a"]
    assert out["prefill"] == pytest.approx(1000 * active_params(moe) / RATES["H100"]["prefill"])
    fp32 = time_plan(moe, torch.float32, work, kind="H100", show=False)[0]["a"]
    assert fp32["prefill"] == pytest.approx(2 * out["prefill"]) and fp32["train"] == pytest.approx(2 * out["train"])
    config = tiny[0].config
    cpu = time_plan(config, torch.float32, work, kind="cpu", show=False)[0]["a"]
    assert cpu["prefill"] == pytest.approx(1000 * count_params(config)[0] / RATES["cpu"]["prefill"])
    # decoding: 256 rows reach every expert; transformers' batched_mm path copies an expert per routed slot
    grouped, batched = (decode_bytes(moe, torch.bfloat16, 256, 64, p) for p in ("eager", "batched_mm"))
    assert grouped == pytest.approx(2 * n + 256 * 64 * 2 * 2 * 2 * 16 * 2, rel=1e-3)
    assert batched - grouped == 2 * 256 * 2 * 3 * 32 * 64 * 2 * 2


@pytest.mark.parametrize("checkpointing", [False, True])
def test_plan_matches_a_lora_update_of_a_mixture_of_experts_model(checkpointing):
    """A GRPO update of a random Qwen3-MoE in bf16 (8 layers, 8 experts, 2 a token) with per-expert LoRA r 8
    (lora.LoRAExperts: each routed copy keeps its fp32 inputs to the adapters): the plan's peak within 0.9-1.1."""
    from transformers import AutoModelForCausalLM

    config = tiny_moe(
        num_hidden_layers=8, hidden_size=256, moe_intermediate_size=128, num_attention_heads=8, head_dim=32
    )
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    measured, planned, _ = measure_update(
        lora_rank=8, beta=0.001, grad_checkpointing=checkpointing, prompt_len=448, completion_len=64, model=model
    )
    assert 0.9 < planned / measured < 1.1, (planned, measured)


def test_lora_on_a_mixture_of_experts_model_adapts_every_expert_and_fits_one_h200(tmp_path):
    """transformers 5 fuses a Qwen3-MoE layer's experts into 3-D parameters; LoRA gives each expert its own factors
    (lora.LoRAExperts), and the plan counts them: r (in + out) per expert and fused weight. The paper's scaling
    model (Figure 4), Qwen3-30B-A3B, then trains with LoRA r 64 and checkpointing on one H200, not on an 80 GB card."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.memory_plan import PAPER_MODELS
    from support.lora import LoRAExperts, add_lora
    from support.memory import CARD_SHARE, fit_memory

    config = tiny_moe()
    config.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_config(config)
    params = add_lora(model, 8)
    experts = [m for m in model.modules() if isinstance(m, LoRAExperts)]
    assert len(experts) == 2 and experts[0].gate_up.A.shape == (8, 8, 64) and experts[0].down.B.shape == (8, 64, 8)
    assert count_params(config, 8)[1] == sum(p.numel() for p in params)
    assert fit_memory(str(tmp_path), "fp32", 8, False, False, 1, 4, 64, 16) == (1, 4)
    q30 = AutoConfig.for_model(PAPER_MODELS["Qwen/Qwen3-30B-A3B"][0], **PAPER_MODELS["Qwen/Qwen3-30B-A3B"][1])
    plan = memory_plan(q30, torch.bfloat16, 64, False, True, 2, 1664, 256, 64)
    assert 80e9 < plan["peak"] < CARD_SHARE * 141e9, plan
    attention, experts = 2 * (2048 + 4096) + 2 * (2048 + 512), 128 * ((2 * 768 + 2048) + (2048 + 768))  # a layer's
    assert plan["adapters"] == 4 * 64 * 48 * (attention + experts)  # fp32 A and B: 10.3 GB
