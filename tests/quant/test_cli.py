import pytest

from effml.cli import main


def test_quantize_command_rejects_bad_settings_before_loading(capsys):
    assert main(["quantize", "--w-bits", "9"]) == 2
    assert "w_bits=9 is not supported" in capsys.readouterr().err
    assert main(["quantize", "--method", "flatquant", "--preset", "fast"]) == 2
    assert "preset must be one of" in capsys.readouterr().err


def test_quantize_command_lists_methods():
    with pytest.raises(SystemExit):
        main(["quantize", "--method", "awq"])


@pytest.mark.real_model
def test_quantize_command_end_to_end_saves_a_loadable_w4a4kv4_model(tmp_path, smollm2_pristine, caplog):
    """`effml quantize --method flatquant ... --out DIR` on a tiny llama (SmolLM2's tokenizer): per-block
    progress with the loss before/after, packed int4 weights on disk, and a reload with equal outputs."""
    import logging

    import torch

    import effml
    from effml.testing import tiny_model

    _, tok = smollm2_pristine
    model = tiny_model("llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    folder, out = tmp_path / "tiny", tmp_path / "q"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    with caplog.at_level(logging.INFO, logger="effml"):
        assert main(["-v", "quantize", "--model", str(folder), "--method", "flatquant", "--w-bits", "4", "--a-bits", "4",
                     "--kv-bits", "4", "--epochs", "1", "--n-samples", "2", "--calib-seq-len", "32", "--out", str(out),
                     "--no-eval"]) == 0
    per_block = [r.getMessage() for r in caplog.records if r.getMessage().startswith("flatquant model.layers.")]
    assert len(per_block) == model.config.num_hidden_layers and all("->" in m and "s)" in m for m in per_block)
    loaded = effml.load(out)
    assert 4.0 < loaded.effml_report["linear_bits_per_weight"] < 4.5  # int4 codes + fp16 scale per row (tiny rows)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        again = effml.load(out)
        torch.testing.assert_close(loaded(ids).logits, again(ids).logits, rtol=0, atol=0)
        assert torch.isfinite(loaded(ids).logits).all()
