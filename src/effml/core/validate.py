"""The one check of token-id tensors handed to calibration, pruning, recursify and uptraining.

Every entry point that takes ``[n_samples, seq_len]`` token ids calls :func:`check_token_ids`
before it starts working, so a float tensor, a 1-D tensor or ids outside the vocabulary fail in
milliseconds with a message that says what to pass, not deep inside an embedding lookup (an
index error on CPU, a device-side assert on CUDA) after minutes of calibration.
"""

from __future__ import annotations

import torch
import torch.nn as nn

_HOW = "build one with effml.calibration_data(tokenizer, n_samples=..., seq_len=...)"


def vocab_size(model_or_vocab: nn.Module | int) -> int:
    """The number of rows of the input embedding (what the ids index), or the int given."""
    if isinstance(model_or_vocab, int):
        return model_or_vocab
    emb = model_or_vocab.get_input_embeddings() if hasattr(model_or_vocab, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "num_embeddings"):
        return int(emb.num_embeddings)
    return int(model_or_vocab.config.vocab_size)


def check_token_ids(
    ids, model_or_vocab: nn.Module | int | None = None, what: str = "calib", min_len: int = 1
) -> torch.Tensor:
    """``ids`` as a ``[n, seq_len]`` LongTensor, or a ValueError naming ``what`` and the fix.

    Any integer dtype is accepted (int32 ids from another tokenizer are common) and converted to
    ``long``; floats and bools are refused, since truncating them would silently change the data.
    With ``model_or_vocab`` every id must lie in ``[0, vocab_size)``.
    """
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{what} must be a [n_samples, seq_len] tensor of token ids, got {type(ids).__name__}: {_HOW}")
    if ids.dim() != 2:
        raise ValueError(
            f"{what} must be a [n_samples, seq_len] tensor of token ids, got shape {tuple(ids.shape)}"
            + (" (add a batch dimension: ids[None])" if ids.dim() == 1 else "")
        )
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{what} must hold integer token ids (a [n, seq_len] LongTensor), got dtype {ids.dtype}: {_HOW}")
    if ids.shape[0] < 1 or ids.shape[1] < min_len:
        raise ValueError(f"{what} needs at least 1 sequence of at least {min_len} tokens, got shape {tuple(ids.shape)}")
    ids = ids.long()
    if model_or_vocab is not None:
        vocab = vocab_size(model_or_vocab)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"{what} holds token ids in [{lo}, {hi}] but the model's vocabulary has {vocab} entries "
                f"(ids must be in [0, {vocab - 1}]): tokenize with this model's tokenizer"
            )
    return ids
