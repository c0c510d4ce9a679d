"""Group sampling with a shared prefill: each distinct prompt runs through the model once, its KV cache is
copied to its rows, and the output is the plain path's."""

import copy
import os
from pathlib import Path

import pytest
import torch

from reward import wm_prompt
from support.lm import cache_arg, chat_prompt, sample, shared_prefill
from support.runs import read_jsonl, set_seed


@pytest.fixture(scope="module")
def wm_prompts(tiny, triplets):
    """Three real ALFWorld world-model prompts of different lengths, repeated out of order (rows 0, 2, 5 share)."""
    tok = tiny[1]
    a, b, c = [chat_prompt(tok, wm_prompt(t)) for t in read_jsonl(triplets)[:3]]
    return [a, b, a, c, b, a]


def forward_widths(model, run):
    """(batch, tokens) of every forward pass of the decoder while `run()` runs."""
    seen = []
    hook = model.model.register_forward_pre_hook(
        lambda m, args, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        out = run()
    finally:
        hook.remove()
    return out, seen


def test_greedy_shared_prefill_is_the_plain_path_token_for_token(tiny, wm_prompts):
    model, tok = tiny
    plain, plain_passes = forward_widths(model, lambda: sample(model, tok, wm_prompts, 12, temperature=0, share=False))
    shared, shared_passes = forward_widths(model, lambda: sample(model, tok, wm_prompts, 12, temperature=0))
    assert [s[:2] for s in shared] == [p[:2] for p in plain]  # prompt ids and completion ids, row by row
    width = plain_passes[0][1]
    assert plain_passes[0] == (6, width)  # the plain path prefills all 6 rows
    assert shared_passes[0] == (3, width - 1)  # the shared path: the 3 distinct prompts once, all but the last token
    assert shared_passes[1] == (6, 1)  # then every row from its last prompt token on
    assert all(p[1] == 1 for p in shared_passes[1:])


def test_sampling_draws_the_same_tokens_from_one_seed(tiny, wm_prompts):
    """Decoding consumes the random stream alike on both paths (one draw per step over all rows), so one seed
    gives the same samples unless float rounding in the logits flips a draw (not on these prompts in fp32)."""
    model, tok = tiny
    set_seed(0)
    plain = sample(model, tok, wm_prompts, 8, temperature=1.0, share=False)
    set_seed(0)
    shared = sample(model, tok, wm_prompts, 8, temperature=1.0)
    assert [s[1] for s in shared] == [p[1] for p in plain]
    assert len({tuple(s[1]) for s in shared[0::2]}) > 1  # rows of one prompt still differ from each other


def test_n_repeats_each_prompt_in_a_row_and_distinct_prompts_share_nothing(tiny, wm_prompts):
    model, tok = tiny
    out = sample(model, tok, wm_prompts[:2], 4, temperature=1.0, n=3)
    ids = [p for p, _, _ in out]
    assert ids[0] == ids[1] == ids[2] != ids[3] == ids[4] == ids[5]
    batch = tok(wm_prompts[:2], return_tensors="pt", padding=True, add_special_tokens=False)
    assert shared_prefill(model, wm_prompts[:2], batch) is None  # nothing repeats: the plain path
    batch = tok(wm_prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    cache = shared_prefill(model, wm_prompts, batch)
    keys = cache.layers[0].keys
    assert keys.shape[0] == 6 and torch.equal(keys[0], keys[2]) and torch.equal(keys[0], keys[5])
    assert not torch.equal(keys[0], keys[1])


def test_the_checkpoints_generation_config_changes_no_sample(tiny, wm_prompts):
    """Sampling is pi_theta and greedy decoding its argmax whatever the checkpoint's generation_config.json sets
    (Qwen2.5-7B-Instruct's: repetition_penalty 1.05, top_p 0.8, top_k 20): the same weights with a config that
    sets repetition_penalty 1.3, top_k 3, no_repeat_ngram_size 2 (and more) draw the same tokens from one seed."""
    model, tok = tiny

    def decode():
        set_seed(0)
        sampled = sample(model, tok, wm_prompts[:2], 8, temperature=1.0, n=2)  # the shared prefill too
        greedy = sample(model, tok, wm_prompts[:2], 8, temperature=0, share=False)
        return [s[1] for s in sampled + greedy]

    plain = decode()
    own = model.generation_config
    model.generation_config = copy.deepcopy(own)
    model.generation_config.update(
        repetition_penalty=1.3, top_k=3, no_repeat_ngram_size=2, top_p=0.8, temperature=0.7, min_new_tokens=20
    )
    try:
        offending = decode()
    finally:
        model.generation_config = own
    assert offending == plain


def test_the_prefill_makes_no_logits_but_the_last_tokens_and_the_same_cache(tiny, wm_prompts):
    """shared_prefill needs no logits: a [prompts, tokens, vocab] tensor would be ~7 GB at 16 x 1.4k tokens of
    Qwen's vocabulary. Only the last position's are made, and the cache is the full forward's."""
    model, tok = tiny
    batch = tok(wm_prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    shapes = []
    hook = model.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.logits.shape)))
    try:
        cache = shared_prefill(model, wm_prompts, batch)
    finally:
        hook.remove()
    assert shapes == [(3, 1, model.config.vocab_size)]  # 3 distinct prompts, one position each
    rows = torch.tensor([0, 1, 3])
    ids, mask = batch["input_ids"][rows, :-1], batch["attention_mask"][rows, :-1]
    full = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
    keys = getattr(full, cache_arg(model)).layers[-1].keys
    assert torch.equal(cache.layers[-1].keys[[0, 1, 3]], keys)


def test_static_cache_decoding_is_the_eager_path_token_for_token(tiny, wm_prompts, monkeypatch):
    """The compiled path (the static cache, the decoding step under torch.compile) and transformers' DynamicCache
    (static=False) decode greedily what the default path (the static cache, eager) does, with the shared prefill
    (each distinct prompt prefilled once, copied into the static cache) and without. Dynamo's "eager" backend: the
    capture of the step and the static cache, without inductor, which takes ~50 s to compile the tiny model on 2 CPU
    cores (RWML_TEST_INDUCTOR=1 runs it with inductor too).
    Why eager decoding stays the default on CUDA (RWML_COMPILE_DECODING=on opts in; bench/gpu_check.py times both):
    in an eager decoding step transformers' SDPA packs SmolLM2's 9 query heads onto its 3 key/value heads; the
    compiled step repeats K and V to 9 heads, over the static cache rounded up to lm.CACHE_BLOCK tokens."""
    from transformers import StaticCache

    import support.lm as lm

    model, tok = tiny
    if not os.environ.get("RWML_TEST_INDUCTOR"):
        monkeypatch.setattr(lm, "COMPILE_BACKEND", "eager")
    prompts = wm_prompts[:4]  # a, b, a, c: one prompt twice
    prefills, caches = [], []
    prefill = lm.prefill_distinct
    monkeypatch.setattr(lm, "prefill_distinct", lambda *a: prefills.append(prefill(*a)) or prefills[-1])
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: caches.append(kw[cache_arg(model)]) or generate(**kw))
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention  # (query heads, rows, key heads, tokens)
    # the record runs outside dynamo's graph: appended to inside the traced step, it took the compiled pass from
    # 18 s to 72 s on 2 cores
    record = torch.compiler.disable(lambda q, k: seen.append((q.shape[1], q.shape[2], k.shape[1], k.shape[2])))
    spy = lambda q, k, v, *a, **kw: record(q, k) or sdpa(q, k, v, *a, **kw)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    eager = sample(model, tok, prompts, 8, temperature=0, compiled=False)
    assert prefills[-1] is not None and isinstance(caches[-1], StaticCache)
    width = max(len(p) for p, _, _ in eager)
    steps = [s for s in seen if s[1] not in (1, width - 1)]  # the decoding steps: the prefills run 1 or width - 1
    assert {s for s in steps} == {(3, 3, 3, width + 8)}, steps  # packed, over the cache allocated for 8 new tokens
    seen.clear()
    dynamic = sample(model, tok, prompts, 8, temperature=0, compiled=False, static=False)
    assert [s[:2] for s in dynamic] == [e[:2] for e in eager] and not isinstance(caches[-1], StaticCache)
    steps = [s for s in seen if s[1] not in (1, width - 1)]
    assert {s[:3] for s in steps} == {(3, 3, 3)} and steps[-1][3] == width + 7, steps  # packed, the filled cache
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for share in (True, False):
        seen.clear()
        static = sample(model, tok, prompts, 8, temperature=0, compiled=True, share=share)
        assert [s[:2] for s in static] == [e[:2] for e in eager], share
        assert isinstance(caches[-1], StaticCache)
        if share:  # repeated to 9 heads, over the whole static cache
            assert {s for s in seen if s[1] == 1} == {(9, 1, 9, -(-(width + 8) // lm.CACHE_BLOCK) * lm.CACHE_BLOCK)}
    assert len(prefills) == 3 and prefills[2] is not None  # the shared prefill ran in the compiled path too
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the decoding step was captured


def test_a_decoding_step_writes_its_token_and_reads_the_cache_once(tiny):
    """lm.sample allocates the KV cache once (`static_decoding`): a decoding step writes its token's K and V and
    reads the weights and the allocated cache once. transformers' DynamicCache (sample's static=False) concatenates
    every layer's cache with the new token, so it writes the whole filled cache again at every step and reads it
    twice (the copy, then attention). Bytes of one step of 8 rows after a 256-token prompt, with room for 64 more,
    counted op by op (bench/memory_plan.BytesMoved)."""
    from transformers import DynamicCache

    from bench.memory_plan import BytesMoved
    from support.lm import static_decoding

    model, c = tiny[0], tiny[0].config
    rows, P, N = 8, 256, 64
    ids = torch.randint(100, 40000, (rows, P), generator=torch.Generator().manual_seed(0))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    filled, allocated = rows * P * per_token, rows * (P + N) * per_token
    moved = {}
    for kind in ("static", "dynamic"):
        with torch.no_grad():
            prompts = [str(i) for i in range(rows)]  # all distinct: no shared prefill
            cache = static_decoding(model, prompts, batch, N, False, False)[0] if kind == "static" else DynamicCache()
            model(input_ids=ids, **{cache_arg(model): cache}, cache_position=torch.arange(P), logits_to_keep=1)
            with BytesMoved() as moved[kind]:
                model(input_ids=ids[:, -1:], **{cache_arg(model): cache}, cache_position=torch.tensor([P]))
    static, dynamic = moved["static"], moved["dynamic"]
    assert 0.99 * filled < dynamic.written - static.written < 1.01 * filled  # the rewrite of the whole cache
    assert abs((dynamic.read - static.read) - (2 * filled - allocated)) < 0.01 * filled
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert static.read < weights + allocated + 2 * static.written  # the rest: this step's activations, written, read


def test_a_row_stopped_by_a_stop_string_ends_on_it_not_on_a_pad_it_never_sampled(tiny):
    """Rows that stop at different steps by a stop string: each completion is the row's own greedy tokens up to
    the first one that completes the stop string (or its EOS), nothing after. `generate` pads a finished row
    while others run, and the tiny model's pad is its EOS (as Qwen's <|endoftext|> is one of its EOS ids):
    a cut at the first pad would keep one token the model never sampled."""
    model, tok = tiny
    questions = ["Count to five, then say done.", "Name three colors.", "Say hello inside <action></action> tags."]
    prompts = [chat_prompt(tok, q) for q in questions]
    free = sample(model, tok, prompts, 32, temperature=0)  # the same batch without a stop string
    stopped = sample(model, tok, prompts, 32, temperature=0, stop=["."])
    eos = model.generation_config.eos_token_id
    lengths = []
    for (_, ids, _), (_, got, _) in zip(free, stopped):
        k = next(k for k in range(1, len(ids) + 1) if "." in tok.decode(ids[:k]) or ids[k - 1] == eos)
        assert got == ids[:k], (got, ids)  # exactly the sampled tokens: no pad appended
        lengths.append(k)
    assert len(set(lengths)) == len(lengths)  # the rows stopped at three different steps


def test_a_mixture_of_experts_model_keeps_its_grouped_experts_while_decoding():
    """Off the CPU, `generate` switches "grouped_mm" experts to "batched_mm" for decoding, which copies one
    expert's weights per routed token (Qwen3-30B-A3B at 256 rows: ~19 GB a layer a step). The switch keys on the
    device not being the CPU, so the meta device shows it here; lm.grouped_experts leaves the experts grouped."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from support.lm import fused_experts, grouped_experts

    config = AutoConfig.for_model(
        "qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
    )  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert set(fused_experts(model)) == {
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.down_proj",
    }
    assert model.get_experts_implementation()[""] == "grouped_mm"
    with model._optimize_model_for_decode():  # what generate does around its decoding loop
        assert model.get_experts_implementation()[""] == "batched_mm"
    with grouped_experts(model), model._optimize_model_for_decode():
        assert model.get_experts_implementation()[""] == "grouped_mm"
    with model._optimize_model_for_decode():  # the method is back after the call
        assert model.get_experts_implementation()[""] == "batched_mm"


def test_a_half_converted_tiny_model_is_rebuilt_not_returned(tiny, tmp_path, monkeypatch):
    """The cache an older race left (the tokenizer without the weights and config, a folder every later process
    returned as it was) is converted again into the whole model: the same weights as the session's tiny model."""
    from transformers import AutoModelForCausalLM

    from support.lm import TINY_MODEL, is_complete, resolve_model

    half = tmp_path / "smollm2-135m-instruct"
    half.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (half / f).write_bytes((Path(resolve_model(TINY_MODEL)) / f).read_bytes())
    monkeypatch.setenv("RWML_CACHE", str(tmp_path))
    assert not is_complete(half)
    assert resolve_model(TINY_MODEL) == str(half) and is_complete(half)
    rebuilt = AutoModelForCausalLM.from_pretrained(half).state_dict()
    assert all(torch.equal(rebuilt[n], w) for n, w in tiny[0].state_dict().items())
