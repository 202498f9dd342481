import copy
import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2_pristine():
    """SmolLM2-135M loaded once per session. Never modify it: use ``smollm2``."""
    import effml

    return effml.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_pristine():
    """Gemma-3-270M loaded once per session (converted from its GGUF once per machine). Never
    modify it: use ``gemma3``."""
    import effml

    return effml.load_model("gemma3-270m")


@pytest.fixture
def gemma3(gemma3_pristine):
    model, tok = gemma3_pristine
    return copy.deepcopy(model), tok


@pytest.fixture
def smollm2(smollm2_pristine):
    """A private copy of SmolLM2-135M (model, tokenizer) that a test may modify."""
    model, tok = smollm2_pristine
    return copy.deepcopy(model), tok
