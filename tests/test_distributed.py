"""torchrun (gloo on CPU): DDP and FSDP make the update of one process; both training scripts end to end."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from ddp_worker import case, optimizer_for, trained

from conftest import ROOT
from grpo import grpo_update
from support.lm import is_complete
from support.runs import read_jsonl


def torchrun(*args, timeout=600, **env):
    """Two ranks on CPU; a hang (a collective one rank never joins) fails the test and kills every rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **env)  # two ranks share the cores
    # glibc gives every freed block over 32 MB back to the kernel, and the next gather or checkpoint faults its pages
    # in again: with these the fixture's run took 5.0 M page faults instead of 7.8 M, 158 s of CPU instead of 176
    env.update(MALLOC_MMAP_THRESHOLD_=str(2**32), MALLOC_TRIM_THRESHOLD_=str(2**32))
    p = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError(f"torchrun {' '.join(args[:2])} did not finish in {timeout} s") from None
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def failure(r):
    """What a failed torchrun printed: each rank's first error line (a crashed rank's cause sits above the
    tracebacks of the ranks it took down), then the tail."""
    first = [line for line in r.stderr.splitlines() if "Error" in line or "error" in line or "terminate" in line]
    return "\n".join(first[:10]) + "\n...\n" + r.stderr[-3000:]


MODES = ["token-mean", "seq-mean", "fsdp"]
# full fine-tuning sharded over the 2 ranks, a triplet each (uneven ranks: the modes' updates), keeping AdamW's state
# in the final checkpoint (a finished run drops it) so that the resume restores it shard by shard; then Policy RL
RWML = "train_wm.py --mode rwml --batch-size 2 --group-size 2 --max-new-tokens 4 --eval-every 1 --lr 1e-5"
RWML += " --micro-batch 2 --save-every 1 --fsdp --no-start-eval --val-size 2 --keep-optimizer"
POLICY = "train_policy.py --games 2 --games-per-step 2 --group-size 2 --updates 1 --max-steps 1 --max-new-tokens 8"
POLICY += " --lora-rank 4"


@pytest.fixture(scope="module")
def ranks(triplets, tmp_path_factory):
    """One torchrun whose two ranks (started once: each start imports torch and transformers again) make the
    update of every mode, then run the stage scripts as `torchrun SCRIPT ...` would: RWML for one step with FSDP,
    the same run resumed for a second, and Policy RL with DDP. The ranks start on an empty model cache, as a new
    user's first `torchrun` would: both need the tiny model converted at once. (out folder, CompletedProcess)"""
    out = tmp_path_factory.mktemp("ranks")
    rwml = [*RWML.split(), "--triplets", str(triplets), "--out", str(out / "rwml")]
    scripts = [
        rwml + ["--max-steps", "1"],
        rwml + ["--max-steps", "2", "--resume"],
        POLICY.split() + ["--out", str(out / "policy")],
    ]
    argv = (x for argv in scripts for x in ["--", *argv])
    r = torchrun("tests/ddp_worker.py", str(out), *MODES, *argv, RWML_CACHE=str(out / "cache"))
    assert r.returncode == 0, failure(r)
    return out, r


@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_make_the_update_of_the_whole_batch(ranks, mode):
    model, ref, seqs, adv, args = case(mode)
    before = trained(model)
    alone = grpo_update(model, optimizer_for(model), seqs, adv, args, ref)  # all 6 sequences in one process
    ranks = torch.load(ranks[0] / f"{mode}.pt")
    assert ranks["weights"].keys() == before.keys()
    for name, p in trained(model).items():
        step_alone, step_ranks = p - before[name], ranks["weights"][name] - before[name]
        assert step_alone.abs().max() > 0
        assert (step_ranks - step_alone).abs().max() < 1e-3 * step_alone.abs().max(), name  # fp32 sums in another order
    for k in ("loss", "kl", "clipfrac", "entropy", "grad_norm"):
        assert ranks["stats"][k] == pytest.approx(alone[k], rel=1e-3, abs=1e-9), k


def test_torchrun_trains_the_world_model_with_fsdp_and_the_policy_with_ddp(ranks):
    out, r = ranks
    # on the empty cache one rank converted the tiny model, the other waited, and both loaded the whole folder
    assert r.stdout.count("converting ") == 1 and is_complete(out / "cache" / "smollm2-135m-instruct")
    assert "FSDP over 2" in r.stdout
    rows = read_jsonl(out / "rwml" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2]  # rank 0 writes, once per step; the sharded optimizer came back
    assert all("train/reward" in row and "heldout/reward" in row for row in rows)
    saved = torch.load(out / "rwml" / "checkpoint" / "trainer.pt", weights_only=False)
    assert saved["step"] == 2 and "saved without its AdamW state" not in r.stdout
    # AdamW's step count: 2 where rank 0 sent each rank its shards of step 1's state, 1 where the resume started afresh
    adam = saved["optimizer"]["state"]
    assert len(adam) == 272 and {float(s["step"]) for s in adam.values()} == {2.0}
    rollouts = read_jsonl(out / "policy" / "rollouts.jsonl")
    assert len(rollouts) == 4 and len({(x["game"], x["episode"]) for x in rollouts}) == 4  # 2 games x G 2, from 2 ranks
    assert read_jsonl(out / "policy" / "metrics.jsonl")[0]["groups"] == 2


def test_collectives_reduce_on_the_ranks_gpu_under_nccl_and_on_the_cpu_under_gloo():
    """NCCL reduces no CPU tensor (the first update of a multi-GPU run would stop): all_sum's tensor lives on the
    rank's GPU under NCCL, on the CPU under gloo; run alone it makes none."""
    from support.distributed import all_sum, collective_device

    assert collective_device("nccl", local_rank=1) == torch.device("cuda", 1)
    assert collective_device("gloo", local_rank=1) == torch.device("cpu")
    assert collective_device() == torch.device("cpu")  # no process group here
    assert all_sum([1, 2.5, True]) == [1.0, 2.5, 1.0]
