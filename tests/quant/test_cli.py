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
