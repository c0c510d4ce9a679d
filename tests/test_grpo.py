"""GRPO written by hand: advantages, clipped objective, KL, LoRA reference, and a real tiny-model run."""

import argparse
import contextlib
import copy
import os
import sys

import pytest
import torch

from grpo import collate, completion_logprobs, group_advantages, grpo_loss, grpo_update
from support.checks import check_model
from support.lm import chat_prompt, load_model, sample
from support.lora import adapters_off, add_lora
from support.runs import complete, find_checkpoint, run_stage, set_seed
from support.training import load_checkpoint, save_checkpoint, start_training


def test_group_advantages_by_hand():
    """Each reward minus its group's mean, over the group's unbiased std + eps; a group of equal rewards gets 0
    and is counted as without signal."""
    adv, no_signal = group_advantages([1, 0, 0, 1, 1, 1, 1, 1], group_size=4)
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735; group 2: all equal -> 0, no signal
    a = 0.5 / (3**-0.5 + 1e-4)
    assert adv[:4].tolist() == pytest.approx([a, -a, -a, a], rel=1e-5)
    assert adv[4:].tolist() == [0, 0, 0, 0] and no_signal == 1


@pytest.mark.parametrize("a", [1.0, -1.0])
def test_clipped_objective_gradient_sign_and_clipping(a):
    """Descending the loss raises the log-probs of tokens with a positive advantage and lowers those with a
    negative one; beyond the clip range in the advantage's direction the gradient is 0."""
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    mask = torch.ones(1, 2)
    loss, _ = grpo_loss(logp, logp.detach(), None, torch.tensor([a]), mask, 0.2, 0.0, torch.tensor([2.0]))
    loss.backward()
    # descending the loss raises log-probs of positively rewarded tokens and lowers negative ones
    assert (torch.sign(-logp.grad) == torch.sign(torch.tensor(a))).all()
    # outside the trust region in the advantage's direction the gradient is zero (clipped)
    old = logp.detach() - (0.5 if a > 0 else -0.5)  # ratio e^{+-0.5}: beyond 1 +- 0.2
    logp.grad = None
    loss, s = grpo_loss(logp, old, None, torch.tensor([a]), mask, 0.2, 0.0, torch.tensor([2.0]))
    loss.backward()
    assert logp.grad.abs().sum() == 0 and s["clipfrac"] == 2


def test_k3_kl_by_hand():
    """The KL term per token is never negative, 0 where pi and pi_ref agree, 0.3679 (by hand) at log pi = -1,
    log pi_ref = -2, and its mean under pi is the exact KL(pi || pi_ref) of two categorical distributions."""
    logp, ref = torch.tensor([[-1.0, -0.5]]), torch.tensor([[-2.0, -0.5]])
    loss, s = grpo_loss(logp, logp, ref, torch.tensor([0.0]), torch.ones(1, 2), 0.2, 1.0, torch.tensor([1.0]))
    assert s["kl"] == pytest.approx(0.36787944, rel=1e-6) and loss.item() == pytest.approx(s["kl"])  # A = 0: beta KL
    pi, pi_ref = torch.tensor([0.5, 0.3, 0.15, 0.05]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    every = torch.log(pi)[None], torch.log(pi_ref)[None]  # each token of the vocabulary once, weighed by pi below
    _, s = grpo_loss(every[0], every[0], every[1], torch.tensor([0.0]), pi[None], 0.2, 1.0, torch.tensor([1.0]))
    exact = torch.distributions.kl_divergence(
        torch.distributions.Categorical(pi), torch.distributions.Categorical(pi_ref)
    )
    assert s["kl"] == pytest.approx(exact.item(), rel=1e-5)
    for a, b in zip(every[0][0], every[1][0]):  # each token alone: never below 0
        assert (
            grpo_loss(
                a[None, None], a[None, None], b[None, None], torch.zeros(1), torch.ones(1, 1), 0.2, 1.0, torch.ones(1)
            )[1]["kl"]
            >= 0
        )


def test_loss_normalisation_token_mean_and_sequence_mean(tiny):
    """At the update's first pass the ratio is 1, so the loss is -sum_i A_i |o_i| / norm_i: with completions of
    2 and 4 tokens and A = (1, 0.5), -(2 + 2) / 6 as a token mean and -(1 + 0.5) / 2 as a sequence mean."""
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    add_lora(model, rank=4)
    seqs = [(tok("a b c")["input_ids"], [300, 301]), (tok("d e")["input_ids"], [302, 303, 304, 305])]
    for token_mean, expected in [(True, -4 / 6), (False, -0.75)]:
        args = args_for(micro_batch=1, ppo_epochs=1, token_mean=token_mean)  # one micro-batch a sequence
        stats = grpo_update(model, torch.optim.SGD(model.parameters(), lr=0.0), seqs, [1.0, 0.5], args)
        assert stats["loss"] == pytest.approx(expected, rel=1e-5), token_mean


def test_kl_zero_and_ratio_one_when_policy_old_and_reference_coincide(tiny):
    """Where the policy, the sampling policy and the reference are one model, the KL term is 0 and no ratio is
    clipped."""
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    add_lora(model, rank=4)  # B = 0: the adapted model is the reference
    seqs = [
        (tok(chat_prompt(tok, "Name a fruit."))["input_ids"], tok(" apple")["input_ids"] + [tok.eos_token_id]),
        (tok(chat_prompt(tok, "Hi"))["input_ids"], tok(" hello there")["input_ids"]),
    ]
    ids, attn, P = collate(seqs, "cpu")
    with torch.no_grad():
        logp, _ = completion_logprobs(model, ids, attn, P)
        with adapters_off(model):
            ref, _ = completion_logprobs(model, ids, attn, P)
    mask = attn[:, P:].float()
    loss, s = grpo_loss(logp, logp, ref, torch.tensor([1.0, -1.0]), mask, 0.2, 0.1, mask.sum(1))
    assert s["kl"] == pytest.approx(0.0, abs=1e-6) and s["clipfrac"] == 0
    # with ratio 1 and A = +-1 the loss is -(mean A over tokens) per row: -1 + 1 = 0
    assert loss.item() == pytest.approx(0.0, abs=1e-5)


def test_collate_puts_completions_at_one_column_and_logprobs_match_a_plain_forward(tiny):
    model, tok = tiny
    seqs = [([1, 2, 3, 4], [5, 6]), ([7, 8], [9, 10, 11])]
    ids, attn, P = collate(seqs, "cpu")
    assert P == 4 and ids.tolist() == [[1, 2, 3, 4, 5, 6, 0], [0, 0, 7, 8, 9, 10, 11]]
    with torch.no_grad():
        logp, _ = completion_logprobs(model, ids, attn, P)
        alone = model(torch.tensor([[7, 8, 9, 10, 11]])).logits.log_softmax(-1)
    want = [alone[0, i, t].item() for i, t in zip(range(1, 4), [9, 10, 11])]
    assert logp[1].tolist() == pytest.approx(want, abs=1e-4)


def test_log_probs_and_the_update_are_those_of_the_sampling_temperature(tiny):
    """Sequences sampled at T are scored under softmax(logits / T): the ratio's pi_old is the distribution that
    drew them. At T = 0.5 the tokens' log-probs are a plain forward's at T, and the update's entropy is lower."""
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    seqs = [(tok(chat_prompt(tok, "Name a fruit."))["input_ids"], tok(" apple pie")["input_ids"])]
    ids, attn, P = collate(seqs, "cpu")
    with torch.no_grad():
        logp, _ = completion_logprobs(model, ids, attn, P, temperature=0.5)
        plain = (model(ids).logits[0, P - 1 : -1].float() / 0.5).log_softmax(-1)
    assert logp[0].tolist() == pytest.approx(plain.gather(-1, ids[0, P:, None]).squeeze(-1).tolist(), abs=1e-4)
    entropy = {}
    for T in (0.5, 1.0):
        adapted = copy.deepcopy(model)
        opt = torch.optim.AdamW(add_lora(adapted, rank=4), lr=0.0)
        entropy[T] = grpo_update(adapted, opt, seqs, [0.0], args_for(temperature=T))["entropy"]
    assert 0 < entropy[0.5] < entropy[1.0]


def args_for(**kw):
    base = dict(micro_batch=16, ppo_epochs=1, clip_eps=0.2, beta=0.0, max_grad_norm=1.0, token_mean=True)
    return argparse.Namespace(**{**base, **kw})


def test_grpo_on_a_verifiable_reward_raises_the_mean_reward(tiny):
    """Reward 1 when the tiny model's answer to 'Say the word apple.' contains it (about half of 32 at first), 4
    updates of one group of G = 8: seeds 0-3 measured 0.41-0.50 -> 0.88-0.94 (a rise of 0.3: ~3 standard deviations
    of the difference of two means of 32)."""
    set_seed(0)
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    opt = torch.optim.AdamW(add_lora(model, rank=8), lr=5e-4)
    prompts = [chat_prompt(tok, "Say the word apple.")] * 8
    score = lambda: [float("apple" in t.lower()) for _, _, t in samples]
    samples = sample(model, tok, prompts * 4, max_new_tokens=6)
    before = sum(score()) / 32
    for _ in range(4):
        samples = sample(model, tok, prompts, max_new_tokens=6)
        adv, _ = group_advantages(score(), group_size=8)
        grpo_update(model, opt, [(p, c) for p, c, _ in samples], adv, args_for(beta=0.01))
    samples = sample(model, tok, prompts * 4, max_new_tokens=6)
    assert sum(score()) / 32 > before + 0.3


def save_as_if_on_cuda(obj, path):
    """torch.save(obj, path) with every tensor recorded as on cuda:0, as a GPU run writes its checkpoint: a plain
    torch.load of it fails on a machine without CUDA."""
    from torch import serialization

    tag = lambda storage: "cuda:0" if storage.device.type == "cpu" else None
    serialization.register_package(1, tag, lambda storage, location: None)  # before the CPU's own tagger (10)
    try:
        torch.save(obj, path)
    finally:
        serialization._package_registry[:] = [p for p in serialization._package_registry if p[1] is not tag]
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=False)


def test_checkpoint_resume_restores_step_optimizer_and_adapters(tiny, tmp_path):
    """A checkpoint and --resume give back the step, the optimizer state and the adapters: the resumed update is
    the uninterrupted one."""
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    params = add_lora(model, rank=4)
    opt = torch.optim.AdamW(params, lr=1e-3)
    seqs = [(tok("a b c")["input_ids"], tok(" d e")["input_ids"])]
    grpo_update(model, opt, seqs, torch.tensor([1.0]), args_for())
    save_checkpoint(tmp_path / "ckpt", model, tok, opt, 7, argparse.Namespace(keep_optimizer=True), final=True)
    state = torch.load(tmp_path / "ckpt" / "trainer.pt", weights_only=False)
    assert state["rng"]["cuda"] is None  # no CUDA here; a GPU run saves every device's generator state
    gpu_state = dict(state, rng=dict(state["rng"], cuda=[torch.zeros(16, dtype=torch.uint8)]))
    save_as_if_on_cuda(gpu_state, tmp_path / "ckpt" / "trainer.pt")  # opens here; its CUDA RNG is skipped
    model2 = copy.deepcopy(tiny[0])
    opt2 = torch.optim.AdamW(add_lora(model2, rank=4), lr=1e-3)
    assert load_checkpoint(tmp_path / "ckpt", model2, opt2) == 7
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q), n
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    # the exported folder is a plain HF model with the adapters merged in
    merged, _ = load_model(str(tmp_path / "ckpt" / "model"))
    ids = torch.tensor([tok("a b c d")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, model(ids).logits, atol=1e-4)


def test_every_instant_of_the_checkpoint_swap_resumes_from_the_newest_complete_checkpoint(tiny, tmp_path, capsys):
    """save_checkpoint writes ckpt.tmp (trainer.pt last), renames ckpt -> ckpt.old, ckpt.tmp -> ckpt, deletes
    ckpt.old. Each state a kill can leave (the folders renamed as it would leave them): --resume finds the newest
    complete checkpoint; a half-written ckpt.tmp is never used."""
    model, tok = tiny_llama(tiny[1]), tiny[1]
    opt = torch.optim.AdamW(add_lora(model, rank=4), lr=1e-3)
    for step in (1, 2):
        save_checkpoint(tmp_path / f"s{step}", model, tok, opt, step, argparse.Namespace(x=1))
    half = tmp_path / "half"  # a save killed mid-write: weights written, trainer.pt not yet renamed in
    (half / "model").mkdir(parents=True)
    (half / "model" / "config.json").write_text("{}")
    (half / "trainer.pt.part").write_bytes(b"PK\x03\x04")
    gone = tmp_path / "gone"  # ckpt.old half deleted: its trainer.pt goes first
    (gone / "model").mkdir(parents=True)
    ckpt = tmp_path / "ckpt"
    names = dict(main=ckpt, tmp=tmp_path / "ckpt.tmp", old=tmp_path / "ckpt.old")
    states = [  # (what is on disk, the step resumed, the line said), in the order of the swap
        (dict(main="s1"), 1, None),
        (dict(main="s1", tmp="half"), 1, None),  # writing the new one
        (dict(main="s1", tmp="s2"), 2, "ckpt.tmp is the newest complete checkpoint"),  # written, not swapped
        (dict(old="s1", tmp="s2"), 2, "ckpt.tmp is the newest complete checkpoint"),  # the case
        (dict(main="s2", old="s1"), 2, None),  # swapped, the old one not yet deleted
        (dict(main="s2", old="gone"), 2, None),  # the old one half deleted
        (dict(old="s1", tmp="half"), 1, "ckpt.old is the newest complete checkpoint"),  # only by hand
    ]
    for on_disk, step, said in states:
        for name, src in on_disk.items():
            os.rename(tmp_path / src, names[name])
        capsys.readouterr()
        assert find_checkpoint(ckpt) == ckpt
        out = capsys.readouterr().out
        assert (said in out) if said else out == "", (on_disk, out)
        assert torch.load(ckpt / "trainer.pt", weights_only=False)["step"] == step, on_disk
        assert not (ckpt / "trainer.pt.part").exists()  # never the half-written folder
        model2 = tiny_llama(tiny[1])
        assert load_checkpoint(ckpt, model2, torch.optim.AdamW(add_lora(model2, rank=4))) == step
        if said == "ckpt.tmp is the newest complete checkpoint":  # the cut swap was finished: ckpt.old deleted
            assert sorted(p.name for p in tmp_path.glob("ckpt*")) == ["ckpt"]
        for path in [ckpt, *tmp_path.glob("ckpt.*")]:  # back to their own names for the next state
            if complete(path):
                os.rename(path, tmp_path / f"s{torch.load(path / 'trainer.pt', weights_only=False)['step']}")
            else:
                os.rename(path, half if (path / "trainer.pt.part").exists() else gone)
        if not (tmp_path / "s1").exists():
            save_checkpoint(tmp_path / "s1", model, tok, opt, 1, argparse.Namespace(x=1))
    os.rename(tmp_path / "half", names["tmp"])  # nothing complete: a one-line error, not a half-written folder
    with pytest.raises(SystemExit, match=r"error: --resume: no complete checkpoint in .*ckpt \(nor in ckpt.tmp"):
        start_training(argparse.Namespace(resume=True, lora_rank=4, dtype="fp32"), ckpt, reference=False)


def test_a_finished_run_drops_its_optimizer_state_unless_asked_to_keep_it(tiny, tmp_path, capsys):
    model, tok = tiny_llama(tiny[1]), tiny[1]
    params = add_lora(model, rank=4)
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:  # one AdamW step: moments to keep or drop
        p.grad = torch.ones_like(p)
    opt.step()
    for final, keep, kept in ((False, False, True), (True, True, True), (True, False, False)):
        save_checkpoint(tmp_path / "ckpt", model, tok, opt, 3, argparse.Namespace(keep_optimizer=keep), final=final)
        state = torch.load(tmp_path / "ckpt" / "trainer.pt", weights_only=False)
        assert (state["optimizer"] is not None) == kept and state["adapters"]
        assert (tmp_path / "ckpt" / "model").exists() == final  # LoRA: merged weights at the last save only
        if not final:  # a later stage pointed at it is told why the folder is missing
            with pytest.raises(SystemExit, match=r"saved, its merged weights only at its last update \(--resume"):
                check_model(str(tmp_path / "ckpt" / "model"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing left aside
    capsys.readouterr()
    model2 = tiny_llama(tiny[1])
    assert load_checkpoint(tmp_path / "ckpt", model2, torch.optim.AdamW(add_lora(model2, rank=4))) == 3
    assert "finished run saved without its AdamW state (--keep-optimizer keeps it)" in capsys.readouterr().out


def test_ctrl_c_names_the_newest_complete_checkpoint_and_the_resume_command(tmp_path, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    args, ckpt = argparse.Namespace(out=tmp_path), tmp_path / "checkpoint"
    monkeypatch.setattr(sys, "argv", ["train_wm.py", "--out", str(tmp_path), "--resume"])
    for folders, said in (
        ({}, f"no checkpoint yet in {ckpt} (one every --save-every updates); run it again: python train_wm.py --out"),
        ({"checkpoint": 4}, f"the last checkpoint is {ckpt} (step 4); continue with: python train_wm.py --out"),
        ({"checkpoint": 4, "checkpoint.tmp": 6}, "checkpoint.tmp (step 6); continue with: python train_wm.py --out"),
    ):
        for name, step in folders.items():
            (tmp_path / name).mkdir(exist_ok=True)
            torch.save(dict(step=step), tmp_path / name / "trainer.pt")
        with pytest.raises(SystemExit) as stop:
            run_stage(interrupted, args, ckpt)
        line = capsys.readouterr().err.strip()
        assert stop.value.code == 130 and line.startswith("interrupted: ") and said in line, line
        assert line.endswith(f"{tmp_path} --resume") == ("continue" in said) and "\n" not in line


def tiny_llama(tok, dtype=torch.float32, seed=0):
    """A random-init Llama of 2 layers of width 64 on the tiny model's tokenizer (~3.4M weights, most of them
    the embedding), weights of std 0.02 as a 7B model's: for precision checks that need no trained model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


class TF32(torch.utils._python_dispatch.TorchDispatchMode):
    """fp32 matrix products as a GPU's tensor cores compute them under TF32: each input rounded to TF32's 10-bit
    mantissa (the low 13 bits of fp32's 23 cleared, to nearest), products summed in fp32."""

    MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.MATMULS:
            tf32 = lambda t: ((t.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)
            args = [tf32(a) if torch.is_tensor(a) and a.dtype == torch.float32 else a for a in args]
        return func(*args, **(kwargs or {}))


def test_fp32_weights_computing_in_tf32_still_take_an_update_of_1e_6(tiny):
    """`--dtype fp32` full fine-tuning (the paper's lr 1e-6) computes its matrix products in TF32 on CUDA
    (lm.tf32_matmuls; left alone on CPU, so the CPU experiment computes as before): the weights and AdamW's state stay
    fp32, so an update computed in TF32 (emulated here) moves the same weights as the plain fp32 one, the same way,
    unlike bf16 weights, which round it away."""
    from support.lm import tf32_matmuls

    tok = tiny[1]
    assert not torch.backends.cuda.matmul.allow_tf32  # no model loaded on CUDA in this process
    assert not tf32_matmuls(torch.device("cpu")) and not torch.backends.cuda.matmul.allow_tf32
    try:
        assert tf32_matmuls(torch.device("cuda")) and torch.backends.cuda.matmul.allow_tf32  # what a CUDA run gets
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    seqs = [(tok(chat_prompt(tok, "Name a fruit."))["input_ids"], tok(" An apple, a ripe one.")["input_ids"])] * 2
    ids, attn, P = collate(seqs, "cpu")

    def step(dtype, mode=None):
        model = tiny_llama(tok, dtype).train()
        before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
        with mode or contextlib.nullcontext():
            (-completion_logprobs(model, ids, attn, P)[0].sum()).backward()
        opt.step()
        return torch.cat([(p.detach().float() - before[n]).flatten() for n, p in model.named_parameters()])

    fp32, tf32, bf16 = step(torch.float32), step(torch.float32, TF32()), step(torch.bfloat16)
    moved = lambda d: (d != 0).float().mean().item()
    # every weight with a gradient moves (the embedding rows of tokens not in the batch have none): ~half of them
    assert moved(fp32) > 0.4 and moved(tf32) > 0.99 * moved(fp32) and moved(bf16) < 0.05 * moved(fp32)
    assert (torch.sign(tf32) == torch.sign(fp32))[fp32 != 0].float().mean() > 0.95
    assert tf32.abs().max() < 1.2e-6 and (tf32 - fp32).abs().max() > 0  # TF32 changed the gradients, not the step
