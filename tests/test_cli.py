"""`python -m braze report` runs on CPU, prints the report, writes JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_report_command_on_demo(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "braze", "report", "--model", "demo", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "braze report: 1 graph(s), 2 applied" in proc.stdout
    assert "fused ops on CPU run: interpret" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["summary"]["applied"] == 2 and doc["summary"]["stock_kernels"] is not None


def test_unknown_model_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-m", "braze", "report", "--model", "nope"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "unknown model 'nope'" in proc.stderr
