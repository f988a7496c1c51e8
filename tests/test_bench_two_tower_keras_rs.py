"""bench/run.py's keras-rs two-tower model (opt-in): it runs beside the TFRS one."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
RUN = os.path.join(ROOT, "bench", "run.py")


@pytest.mark.slow
def test_quick_bench_of_both_two_tower_models(tmp_path):
    pytest.importorskip("keras_rs")
    command = [sys.executable, RUN, "--quick", "--models", "two_tower,two_tower_keras_rs",
               "--configs", "plain,query_tower,new_id_embeddings", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "suite.md").read_text()
    assert "TFRS on tf.keras" in table and "keras-rs on Keras 3" in table
    results = json.loads((tmp_path / "suite.json").read_text())
    models = {m["model"]: m["rows"] for m in results["models"]}
    assert set(models) == {"two_tower", "two_tower_keras_rs"}
    tfrs, krs = models["two_tower"], models["two_tower_keras_rs"]
    for config in ("plain", "query_tower", "new_id_embeddings"):
        # the same model on both: the same trainable variables and parameter counts
        assert krs[config]["trainable_paths"] == tfrs[config]["trainable_paths"], config
        assert krs[config]["trainable_params"] == tfrs[config]["trainable_params"], config
    assert set(krs["query_tower"]["trainable_paths"]) == {
        "query/user_embedding/embeddings", "query/projection/kernel", "query/projection/bias"}
    assert krs["query_tower"]["trainable_params"] < krs["plain"]["trainable_params"]
