"""User errors on the command line: one line on stderr saying what to pass, exit code 2, no
traceback. And the CLI modules import without a circle."""

import ast
import sys
from pathlib import Path

import pytest

from effml.cli import main

SRC = Path(__file__).resolve().parents[1] / "src" / "effml"


def test_missing_model_folder_is_one_line_and_exit_2(capsys):
    assert main(["eval", "--model", "/no/such/dir"]) == 2  # an uncaught error would raise here
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    line = captured.err.strip()
    assert line.startswith("effml: error: no such model folder or file: /no/such/dir")
    assert "pass an alias" in line and ".gguf" in line


@pytest.mark.parametrize("argv,message", [
    (["eval", "--model", "./relative/missing"], "no such model folder or file"),
    (["eval", "--model", "/nonexistent/model.gguf"], "GGUF file not found"),
])
def test_other_missing_paths(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_bad_option_value_is_an_argparse_error_not_a_keyerror(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["recursify", "--tie-norms", "maybe", "--out", "x"])
    assert exc.value.code == 2
    assert "--tie-norms takes true, false or foldable, got 'maybe'" in capsys.readouterr().err


def test_bugs_keep_their_traceback(monkeypatch):
    """Only user errors become one line: anything else (here a KeyError) propagates."""
    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setitem(sys.modules["effml.cli_common"].COMMANDS, "eval",
                        (*sys.modules["effml.cli_common"].COMMANDS["eval"][:2], broken))
    with pytest.raises(KeyError, match="a bug"):
        main(["eval"])


def _imports_of(path: Path) -> set[str]:
    """Absolute module names ``path`` imports (relative imports resolved inside effml)."""
    package = ["effml", *path.relative_to(SRC).parent.parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names.add(mod)
            names |= {f"{mod}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_no_module_imports_the_cli_entry_point():
    """effml.cli collects the subcommands; subcommand modules use effml.cli_common, so the CLI,
    the demo and the method CLIs form no import circle."""
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                 if p.name != "__main__.py" and p != SRC / "cli.py" and "effml.cli" in _imports_of(p)]
    assert offenders == []
    assert "effml.cli" not in _imports_of(SRC / "cli_common.py") | _imports_of(SRC / "demo.py")
