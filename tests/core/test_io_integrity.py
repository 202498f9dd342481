"""effml.save records a sha256 of every weight file; effml.load refuses damaged folders with an
error that names the file, and still reads format-1 folders (no digests)."""

import hashlib
import json

import pytest
import torch

import effml
from effml.core.io import FORMAT_VERSION, META_FILE, WEIGHTS_FILE, CheckpointError
from effml.testing import random_ids, tiny_model


@pytest.fixture
def saved(tmp_path):
    model = tiny_model("llama", tie_word_embeddings=True)
    effml.save(model, tmp_path)
    return model, tmp_path


def _meta(path):
    return json.loads((path / META_FILE).read_text())


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte is tensor data: the header comes first
    path.write_bytes(bytes(data))


def test_save_records_the_sha256_of_each_weight_file(saved):
    model, path = saved
    meta = _meta(path)
    assert meta["format_version"] == FORMAT_VERSION == 3
    data = (path / WEIGHTS_FILE).read_bytes()
    assert meta["weights"] == {WEIGHTS_FILE: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}
    ids = random_ids(model)
    assert torch.equal(effml.load(path)(input_ids=ids).logits, model(input_ids=ids).logits)


def test_one_flipped_byte_in_tensor_data_is_refused(saved):
    model, path = saved
    _flip_last_byte(path / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE}.*sha256.*verify=False"):
        effml.load(path)
    loaded = effml.load(path, verify=False)  # the caller asked for it: the altered tensor loads
    changed = [k for k, v in loaded.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert changed == ["model.norm.weight"]  # the last tensor in the file (keys are sorted)


def test_missing_or_truncated_weight_file_is_refused(saved):
    _, path = saved
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE} has {len(data) // 2} bytes.*truncated"):
        effml.load(path)
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE} is not a readable safetensors file"):
        effml.load(path, verify=False)
    (path / WEIGHTS_FILE).unlink()
    for verify in (True, False):
        with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE} is missing"):
            effml.load(path, verify=verify)


def test_corrupt_or_incomplete_meta_is_refused(saved):
    _, path = saved
    meta_path = path / META_FILE
    good = meta_path.read_text()
    meta_path.write_text(good[: len(good) // 2])  # an interrupted write
    with pytest.raises(CheckpointError, match=rf"{META_FILE} is not valid JSON"):
        effml.load(path)
    for key in ("aliases", "modules", "weights", "format_version"):
        meta = json.loads(good)
        del meta[key]
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(CheckpointError, match=rf"{META_FILE} is incomplete or damaged: {key} missing"):
            effml.load(path)
    meta = json.loads(good)
    meta["weights"][WEIGHTS_FILE] = {"sha256": 5}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"weight file '{WEIGHTS_FILE}' is damaged"):
        effml.load(path)
    meta = json.loads(good)
    meta["aliases"]["lm_head.weight"] = "no.such.key"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="no.such.key"):
        effml.load(path)


def test_format_1_folders_still_load(saved):
    """Folders written before digests existed: same layout, no "weights" entry."""
    model, path = saved
    meta = _meta(path)
    del meta["weights"]
    meta["format_version"] = 1
    (path / META_FILE).write_text(json.dumps(meta))
    ids = random_ids(model)
    loaded = effml.load(path)
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
