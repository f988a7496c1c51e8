"""bench/ab_trees.py measures two checkouts side by side (its own file: pytest runs files
in parallel, and this one is long)."""

import os
import re
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_ab_trees_measures_two_checkouts_side_by_side():
    script = os.path.join(ROOT, "bench", "ab_trees.py")
    command = [sys.executable, script, "--base", ROOT, "--quick", "--configs", "plain,wrap_all",
               "--reps", "2", "--steps", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "ready base/wrap_all" in out and "ready new/plain" in out
    assert re.search(r"new: wrap overhead \(everything trainable / plain\) \d+\.\d{3} \(IQR", out)
    assert re.search(r"new / base, wrap_all: \d+\.\d{3}", out)
    bad = subprocess.run([sys.executable, script, "--base", "/nonexistent"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "has no keras_peft/ folder" in bad.stderr
