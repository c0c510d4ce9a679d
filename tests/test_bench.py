"""bench/gpu_check.py, the script a lent GPU runs, on CPU with tiny configs: it must work when a GPU comes."""

import sys

import pytest

from conftest import ROOT, run_script
from support.lm import load_config


def test_gpu_check_runs_on_cpu_and_its_plan_matches_the_measured_peaks():
    r = run_script("bench/gpu_check.py", "--device", "cpu", "--tiny")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split(" | ") for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 10  # 3 models x (2 sampling phases + LoRA update), the tiny model's full fine-tuning
    for row in rows:
        assert 0.8 < float(row[4]) < 1.25, row  # measured / planned, tensor bytes on CPU


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
