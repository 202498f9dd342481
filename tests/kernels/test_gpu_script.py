"""benchmarks/gpu.sh cannot run without a GPU; its dry run checks on CPU that every step's
script exists and accepts the arguments the script passes, so it cannot rot meanwhile."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_script_dry_run_checks_every_step(tmp_path):
    env = {**os.environ, "OUT_DIR": str(tmp_path), "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_summary.json").read_text())
    assert summary["dry_run"] is True
    assert set(summary["steps"]) == {"compile_check", "kernels", "serving", "recursive", "cpu_inference"}
    assert all(s["rc"] == 0 for s in summary["steps"].values())


def test_gpu_script_rejects_unknown_arguments(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--fast"], cwd=ROOT,
                         env={**os.environ, "OUT_DIR": str(tmp_path)}, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "usage" in res.stderr
