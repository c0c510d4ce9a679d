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
    from grpo import load_model

    return load_model("smollm2-135m")
