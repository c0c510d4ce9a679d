"""bench/gpu_check.py, the script a lent GPU runs, on CPU with tiny configs: it must work when a GPU comes."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_script
from support.lm import load_config
from support.runs import read_jsonl


def test_gpu_check_runs_on_cpu_and_its_plan_matches_the_measured_peaks():
    r = run_script("bench/gpu_check.py", "--device", "cpu", "--tiny", "--bandwidth-gbs", "10")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [
        [c.strip() for c in line.strip("|").split(" | ")]
        for line in r.stdout.splitlines()
        if line.startswith("| ") and "---" not in line
    ][1:]
    # 3 dense models x (3 sampling phases on the static cache, the last with LoRA adapters merged, 2 on the dynamic
    # one + LoRA update), the tiny model's full fine-tuning; the MoE model: 2 sampling phases with its experts
    # grouped (lm.sample) and as transformers would decode them, and its LoRA update (per-expert adapters)
    assert all(len(row) == 11 and row[9] == "–" for row in rows)  # reserved GB: CUDA's allocator only
    assert sum(row[1].endswith(", dynamic") for row in rows) == 6
    assert len(rows) == 24 and sum("LoRA r 64" in row[1] and "sampling" in row[1] for row in rows) == 3
    assert [row[0] for row in rows if "GRPO update, LoRA" in row[1]][-1] == "Qwen/Qwen3-30B-A3B"
    assert sum("batched_mm" in row[1] for row in rows) == 2
    for row in rows:
        assert 0.8 < float(row[4]) < 1.25, row  # measured / planned, tensor bytes on CPU
        if "sampling" in row[1]:  # decode step ms | bandwidth limit ms | limit / step
            step, limit, ratio = map(float, row[6:9])
            assert step > 0 and limit > 0 and ratio == pytest.approx(limit / step, abs=0.01), row


def test_the_decode_limit_is_the_bytes_a_step_reads_over_the_bandwidth():
    """Qwen2.5-7B in bf16 at batch 64 and 1,536 tokens of context reads ~15 GB of weights and ~6 GB of KV cache
    a step: ~6 ms at the H100's 3.35 TB/s (issue 31's figure), ~4.4 ms at the H200's 4.8 TB/s."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_check import MODELS, decode_limit
    from transformers import AutoConfig

    from support.memory import count_params

    kind, fields = MODELS["Qwen/Qwen2.5-7B-Instruct"]
    config = AutoConfig.for_model(kind, **fields)
    weights = 2 * count_params(config)[0]
    kv = 64 * 1536 * 28 * 2 * 4 * 128 * 2  # rows x tokens x layers x (K, V) x KV heads x head dim x bf16 bytes
    assert 15e9 < weights < 15.5e9 and 5.5e9 < kv < 6e9
    assert decode_limit(config, torch.bfloat16, 64, 1536, 3.35e12) == pytest.approx((weights + kv) / 3.35e12)
    assert decode_limit(config, torch.bfloat16, 64, 1536, 4.8e12) == pytest.approx(4.4e-3, rel=0.02)


def test_gpu_check_builds_the_tiny_model_from_its_published_config():
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_check import SMOLLM2

    config = load_config("smollm2-135m")
    kind, fields = SMOLLM2
    assert config.model_type == kind
    for k, v in fields.items():
        got = getattr(config, k)
        if k == "rope_parameters":
            got, v = got["rope_theta"], v["rope_theta"]
        assert got == (pytest.approx(v, rel=1e-6) if isinstance(v, float) else v), k


def test_gpu_stages_gives_every_stage_flags_it_takes(tmp_path):
    """Each command of bench/gpu_stages.py, parsed by its stage script: a renamed flag fails here, not on a GPU."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_stages

    commands = gpu_stages.stage_commands(tmp_path, str(tmp_path / "model"), str(tmp_path / "embedder"))
    assert list(commands) == list(gpu_stages.STAGES)
    for argv in (argv for stage in commands.values() for argv in stage):
        for x in argv:  # the model folders a stage is given (NAME=FOLDER too) exist once the stages before ran
            path = x.rpartition("=")[2]
            if path.endswith(gpu_stages.CKPT) or path == str(tmp_path / "model"):
                os.makedirs(path, exist_ok=True)
        script, args = gpu_stages.stage_args(argv)
        assert script.endswith(".py") and args is not None


@pytest.mark.skipif(
    not os.environ.get("RWML_SLOW_TESTS"),
    reason="~3.5 min on 2 cores, past make test's budget: RWML_SLOW_TESTS=1 runs it (the stages' own tests run them)",
)
def test_gpu_stages_runs_on_cpu_and_a_resumed_rwml_run_equals_the_uninterrupted_one(tmp_path):
    """bench/gpu_stages.py --device cpu up to the kill/resume check (the rest: make gpu-stages, docs/scaling.md):
    every stage exits 0, and RWML's updates are real (the model is taught the format, so groups hold both
    rewards: the first update's do; the second's may all agree), so the resumed run's equality is not that of
    two runs that change nothing."""
    stages = "collect,heldout,warmup,filter,rwml,resume"
    r = subprocess.run(
        [sys.executable, "bench/gpu_stages.py", "--device", "cpu", "--stages", stages, "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line.split(" | ") for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row[0].strip("| ") for row in rows] == stages.split(",")
    assert all(row[2] == "0" for row in rows)
    assert "equals the uninterrupted run" in rows[-1][4]
    updates = read_jsonl(tmp_path / "arms" / "rwml_s0" / "metrics.jsonl")
    assert len(updates) == 2 and updates[0]["train/grad_norm"] > 0
    assert 0 < updates[0]["train/reward"] < 1
