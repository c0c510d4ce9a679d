"""torchrun with PyTorch DDP (gloo on CPU): the same update as one process, and both training scripts end to end."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from ddp_worker import adapters, case
from grpo import grpo_update, read_jsonl


def torchrun(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two ranks share the cores
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean"])
def test_two_ranks_make_the_update_of_the_whole_batch(tmp_path, mode):
    model, optimizer, seqs, adv, args = case(token_mean=mode == "token-mean")
    before = adapters(model)
    alone = grpo_update(model, optimizer, seqs, adv, args)  # all 6 sequences in one process
    r = torchrun("tests/ddp_worker.py", str(tmp_path / "ddp.pt"), mode)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = torch.load(tmp_path / "ddp.pt")
    for name, p in adapters(model).items():
        step_alone, step_ddp = p - before[name], ranks["adapters"][name] - before[name]
        assert step_alone.abs().max() > 0
        assert (step_ddp - step_alone).abs().max() < 1e-3 * step_alone.abs().max(), name  # fp32 sums in another order
    for k in ("loss", "kl", "clipfrac", "entropy", "grad_norm"):
        assert ranks["stats"][k] == pytest.approx(alone[k], rel=1e-3, abs=1e-9), k


def test_torchrun_trains_the_world_model_and_the_policy(triplets, tmp_path):
    r = torchrun("train_wm.py", "--mode", "rwml", "--triplets", str(triplets), "--out", str(tmp_path / "rwml"),
                 "--batch-size", "3", "--group-size", "2", "--max-new-tokens", "8", "--val-size", "3", "--eval-every", "1",
                 "--lora-rank", "4", "--lr", "1e-4", "--max-steps", "2", "--micro-batch", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_jsonl(tmp_path / "rwml" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [0, 1, 2]  # rank 0 writes, once per step
    assert "train/reward" in rows[1] and "heldout/reward" in rows[2]
    assert (tmp_path / "rwml" / "checkpoint" / "model" / "config.json").exists()
    r = torchrun("train_policy.py", "--games", "2", "--games-per-step", "2", "--group-size", "2", "--updates", "1",
                 "--max-steps", "2", "--max-new-tokens", "8", "--lora-rank", "4", "--out", str(tmp_path / "policy"))
    assert r.returncode == 0, r.stderr[-3000:]
    rollouts = read_jsonl(tmp_path / "policy" / "rollouts.jsonl")
    assert len(rollouts) == 4 and len({(x["game"], x["episode"]) for x in rollouts}) == 4  # 2 games x G 2, from 2 ranks
    assert read_jsonl(tmp_path / "policy" / "metrics.jsonl")[0]["groups"] == 2
