"""LoRA by hand (support/lora.py): checkpoints that fold the adapters in, rollouts that sample with them merged,
and per-expert adapters of a mixture-of-experts model's fused experts."""

import argparse
import contextlib
import copy

import pytest
import torch
from test_grpo import tiny_llama

from support.lm import cache_arg, load_model
from support.lora import LoRALinear, adapters_merged, adapters_off, add_lora, merged_state_dict
from support.training import save_checkpoint


def test_a_bf16_lora_checkpoint_computes_what_the_trained_model_computed(tiny, tmp_path):
    """bf16 base weights, fp32 adapters moved as a few updates at lr 1e-3 move them (B ~ 1e-3; set directly, not
    by grpo_update, so that the course kit's student copy, whose GRPO loss is cut out, passes this test): the merged
    checkpoint loaded in fp32 computes the trained model's function (far inside the bf16 noise the trained model
    itself computes with), and loaded in bf16 it stays within that noise."""
    tok = tiny[1]
    model = tiny_llama(tok, torch.bfloat16)
    opt = torch.optim.AdamW(add_lora(model, rank=4), lr=1e-3)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.B.normal_(0, 1e-3)
    save_checkpoint(tmp_path / "ckpt", model, tok, opt, 3, argparse.Namespace(), final=True)
    ids = torch.tensor([tok("You are in the middle of a room. Looking around you, you see a desk 1.")["input_ids"]])
    logits = lambda m: m(ids).logits.float()
    with torch.no_grad():
        live = logits(model)  # bf16 weights and activations, as trained
        exact = logits(copy.deepcopy(model).float())  # the same weights and adapters, computed in fp32
        as_fp32 = logits(load_model(str(tmp_path / "ckpt" / "model"), device="cpu", dtype="fp32")[0])
        as_bf16 = logits(load_model(str(tmp_path / "ckpt" / "model"), device="cpu", dtype="bf16")[0])
    noise = (live - exact).abs().max()  # ~5e-3 on logits of scale ~0.8
    assert noise > 0
    assert (as_fp32 - exact).abs().max() < 0.05 * noise  # ~1e-5: fp32 sums in another order
    assert (as_bf16 - exact).abs().max() < 2 * noise


def adapted_llama(tok, dtype, b_std, seed=1):
    """The random tiny Llama with rank-4 adapters whose B is as after some updates."""
    model = tiny_llama(tok, dtype)
    add_lora(model, rank=4)
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.B.normal_(0, b_std)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_with_merged_adapters_computes_what_an_update_computes(tiny, dtype):
    """Rollouts sample with the adapters folded into the weights (lora.adapters_merged): with fp32 weights that is
    the update's function up to fp32's rounding; with bf16 weights, rounded once more, it is as close to the same
    weights computed in fp32 as the update's own forward is (both inside bf16's rounding noise). On exit the
    loaded weights are back bit for bit, and so is the update's function."""
    tok = tiny[1]
    model = adapted_llama(tok, dtype, 1e-2)
    loaded = {n: p.clone() for n, p in model.named_parameters()}
    ids = torch.tensor([tok("You are in the middle of a room. Looking around you, you see a desk 1.")["input_ids"]])
    with torch.no_grad():
        exact = copy.deepcopy(model).float()(ids).logits
    updated = model(ids).logits.detach().float()  # grad enabled: the adapters' path of an update
    with torch.no_grad(), adapters_merged(model):
        sampled = model(ids).logits.float()
    noise = (updated - exact).abs().max()
    if dtype == torch.float32:
        assert (sampled - updated).abs().max() < 1e-4 * updated.abs().max()
    else:
        assert 0 < (sampled - exact).abs().max() < 2 * noise
    assert all(torch.equal(p, loaded[n]) for n, p in model.named_parameters())
    assert torch.equal(model(ids).logits.detach().float(), updated)


MERGED_Q = "model.layers.0.self_attn.q_proj.base.weight"


def test_merged_adapters_are_taken_out_bit_for_bit_even_after_an_error(tiny):
    """bf16 weights: W + d rounded, then - d, is not W; the exit copies the loaded weights back from the host,
    also when the rollout raises, and turns the adapters back on."""
    model = adapted_llama(tiny[1], torch.bfloat16, 1e-2)
    loaded = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="rollout"):
        with adapters_merged(model):
            q = model.model.layers[0].self_attn.q_proj
            assert not q.enabled and not torch.equal(q.base.weight, loaded[MERGED_Q])
            raise RuntimeError("rollout failed")
    assert all(torch.equal(p, loaded[n]) for n, p in model.named_parameters())
    assert all(m.enabled for m in model.modules() if isinstance(m, LoRALinear))


def test_a_decoding_step_with_merged_adapters_launches_the_plain_models_ops(tiny):
    """A GPU's decoding step is bound by its kernel launches, so rollouts fold the adapters in (lora.adapters_merged):
    a step then runs as many aten ops as the model without adapters, where through the adapters every projection
    adds its own (two matmuls, a scale, casts, views). Counted op by op on CPU (bench/memory_plan.BytesMoved)."""
    from transformers import DynamicCache

    from bench.memory_plan import BytesMoved

    tok = tiny[1]
    model = adapted_llama(tok, torch.bfloat16, 1e-2)
    ids = torch.tensor([tok("You are in the middle of a room. Looking around you, you see a desk 1.")["input_ids"]])
    ops = {}
    for kind in ("plain", "adapters", "merged"):
        with torch.no_grad(), (adapters_off if kind == "plain" else adapters_merged if kind == "merged" else
                               contextlib.nullcontext)(model):  # fmt: skip
            cache = {cache_arg(model): DynamicCache()}
            model(input_ids=ids[:, :-1], **cache)
            with BytesMoved() as m:
                model(input_ids=ids[:, -1:], **cache)
        ops[kind] = m.ops
    assert ops["adapters"] > 1.3 * ops["plain"], ops
    assert ops["merged"] <= 1.1 * ops["plain"], ops


def tiny_moe_model(dtype=torch.float32):
    """A random-init Qwen3-MoE at toy width (8 experts, 2 a token), the architecture of the paper's Qwen3-30B-A3B."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2)
    fields.update(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **fields)).to(dtype).eval()


def test_lora_of_fused_experts_trains_each_expert_and_merges_into_a_plain_checkpoint(tmp_path, tiny):
    """Per-expert LoRA (lora.LoRAExperts): with B = 0 the adapters' eager loop computes what transformers' experts
    compute; a backward reaches every expert's factors; rollouts' merged weights, the adapters and the saved
    checkpoint (a plain Qwen3-MoE folder) compute the same function (fp32); the merge is undone bit for bit."""
    from support.lora import LoRAExperts

    model = tiny_moe_model()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(ids).logits
    opt = torch.optim.AdamW(add_lora(model, rank=4), lr=1e-3)
    with torch.no_grad():
        assert (model(ids).logits - plain).abs().max() < 1e-5  # B = 0: the loop is the experts' own function
        for name, p in model.named_parameters():
            if name.endswith(".B"):  # as after some updates
                p.normal_(0, 0.05)
    logits = model(ids).logits
    logits.pow(2).mean().backward()
    experts = [m for m in model.modules() if isinstance(m, LoRAExperts)]
    assert len(experts) == 2 and all(m.gate_up.B.grad.abs().sum(dim=(1, 2)).gt(0).all() for m in experts)
    assert all(m.down.A.grad.abs().sum(dim=(1, 2)).gt(0).all() for m in experts)  # every expert got tokens here
    loaded = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad(), adapters_merged(model):
        merged = model(ids).logits
    assert (merged - logits).abs().max() < 1e-4 * logits.abs().max()
    assert all(torch.equal(p, loaded[n]) for n, p in model.named_parameters())
    save_checkpoint(tmp_path / "ckpt", model, tiny[1], opt, 1, argparse.Namespace(), final=True)
    with torch.no_grad():
        saved = load_model(str(tmp_path / "ckpt" / "model"), device="cpu", dtype="fp32")[0](ids).logits
    assert (saved - logits).abs().max() < 1e-4 * logits.abs().max()


def test_a_lora_update_below_bf16_resolution_survives_the_merge_and_is_counted(tiny, tmp_path):
    """An update of 1e-6 on bf16 weights of 0.02 (a bf16 step there is 1.2e-4): the merge keeps it, in fp32, and
    reports it among the weights that a bf16 copy rounds back."""
    tok = tiny[1]
    model = tiny_llama(tok, torch.bfloat16)
    opt = torch.optim.AdamW(add_lora(model, rank=1), lr=1e-3)
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.base.weight.fill_(0.02)
        layer.A.fill_(1.0)
        layer.B.fill_(1e-6 / layer.scale)  # scale B A = 1e-6 everywhere
    weights, lost = merged_state_dict(model)
    w = weights["model.layers.0.mlp.up_proj.weight"]
    assert w.dtype == torch.float32 and torch.allclose(w - layer.base.weight.float(), torch.tensor(1e-6), atol=1e-8)
    assert torch.equal(w.bfloat16(), layer.base.weight)  # what a bf16 copy would keep: the start
    assert torch.equal(weights["model.layers.0.mlp.down_proj.weight"], model.model.layers[0].mlp.down_proj.base.weight)
    merged = sum(m.base.weight.numel() for m in model.modules() if hasattr(m, "scale"))
    assert lost == layer.base.weight.numel() / merged  # only this layer's updates are lost in bf16, all of them
    save_checkpoint(tmp_path / "ckpt", model, tok, opt, 1, argparse.Namespace(), final=True)
    reloaded = load_model(str(tmp_path / "ckpt" / "model"), device="cpu", dtype="fp32")[0]
    assert torch.equal(reloaded.model.layers[0].mlp.up_proj.weight, w)
