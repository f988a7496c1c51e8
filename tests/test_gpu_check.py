"""bench/gpu_check.sh: it refuses to run without a GPU, and its --dry-run runs every part
on the CPU (there is no GPU here to run the real thing)."""

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_gpu_check_refuses_without_a_gpu_and_its_dry_run_runs_everything(tmp_path):
    script = os.path.join(ROOT, "bench", "gpu_check.sh")
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    refused = subprocess.run(["bash", script, str(tmp_path / "gpu")], capture_output=True,
                             text=True, timeout=300, cwd=ROOT, env=env)
    assert refused.returncode != 0 and "no GPU is visible" in refused.stderr
    dry = subprocess.run(["bash", script, "--dry-run", str(tmp_path / "dry")],
                         capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    summary = (tmp_path / "dry" / "summary.txt").read_text()
    for expected in ("'dry_run': True", "minilm lora4", "vs plain", "caching head_only",
                     "bert demo lora:8: accuracy"):
        assert expected in summary
    assert (tmp_path / "dry" / "suite" / "suite.md").exists()
