import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ALFWORLD_DATA", str(ROOT.parent / "shared" / "alfworld"))


@pytest.fixture(scope="session")
def tiny():
    """The real SmolLM2-135M-Instruct, loaded once for the whole session: (model, tokenizer)."""
    from lm import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def triplets(tmp_path_factory):
    """Real ALFWorld triplets: 2 training games, one random-policy episode of 5 steps each."""
    from collect import collect
    from collect import parse_args as collect_args

    out = tmp_path_factory.mktemp("collect")
    collect(
        collect_args(
            [
                "--policy",
                "random",
                "--split",
                "train",
                "--games",
                "2",
                "--episodes",
                "1",
                "--max-steps",
                "5",
                "--out",
                str(out),
            ]
        )
    )
    return out / "triplets.jsonl"
