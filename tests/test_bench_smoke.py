"""The benchmark suite: its --quick smoke run works end to end; its arithmetic is right.

The smoke run checks that the suite runs and writes its table, not speeds.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import bench_module

ROOT = os.path.join(os.path.dirname(__file__), "..")
RUN = os.path.join(ROOT, "bench", "run.py")


def _suite():
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_theory_follows_the_design_notes():
    suite = _suite()
    assert suite.theory_ratio("plain", 6) == 1.0
    assert suite.theory_ratio("head_only", 6) == pytest.approx(1 / 3)
    assert suite.theory_ratio("top_layers_2", 6) == pytest.approx(10 / 18)  # 3L/(3L-2k), k=4
    assert suite.theory_ratio("lora4", 6) == pytest.approx(2 / 3)


def test_paired_ratios_compare_within_a_repetition():
    suite = _suite()
    base = [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]  # the machine got twice as slow in rep 2
    other = [[0.5, 0.5, 0.6], [1.0, 1.0, 1.2]]
    assert suite.paired_ratios(base, other) == [0.5, 0.5]


def test_quick_run_writes_the_table_and_counts_the_same_lora_variables(tmp_path):
    command = [sys.executable, RUN, "--quick", "--configs", "plain,top_layers_2,lora4,hub_lora4",
               "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (tmp_path / "suite.md").read_text()
    for label in ("plain Keras", "keras-peft top_layers(2)", "keras-peft lora(4)",
                  "keras-hub backbone.enable_lora(4)", "CNN segmenter", "two-tower",
                  "Machine:"):
        assert label in table
    results = json.loads((tmp_path / "suite.json").read_text())
    assert [m["model"] for m in results["models"]] == ["minilm", "cnn", "two_tower"]
    rows = results["models"][0]["rows"]
    assert set(rows["lora4"]["trainable_paths"]) == set(rows["hub_lora4"]["trainable_paths"])
    assert rows["top_layers_2"]["trainable_params"] < rows["plain"]["trainable_params"]
    assert all(r["median_ms"] > 0 for m in results["models"] for r in m["rows"].values())
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "suite.png").stat().st_size > 0


def _study():
    return bench_module("adapters_sst2")


def test_adapter_study_judges_the_goal_only_on_three_seeds(tmp_path):
    study = _study()

    def run(strategy, accuracy, step, percent=1.5):
        return {"strategy": strategy, "val_accuracy": accuracy, "mean_step_s": step,
                "trainable_params": 100, "trainable_percent": percent}

    seeds = {0: [run("full", 0.87, 2.0), run("lora:8", 0.865, 1.5), run("dora:8", 0.85, 1.6)],
             1: [run("full", 0.88, 2.0), run("lora:8", 0.87, 1.5)],
             2: [run("full", 0.86, 2.0), run("lora:8", 0.862, 1.5)]}
    table = study.aggregate(seeds)
    lora = next(r for r in table if r["strategy"] == "lora:8")
    assert lora["seeds"] == 3 and lora["accuracy"]["mean"] == pytest.approx(0.8657, abs=1e-4)
    assert lora["accuracy"]["std"] == pytest.approx(0.00404, abs=1e-4)
    text = study.markdown(table)
    assert "met by lora:8." in text and "Rows with fewer than 3 seeds are not judged." in text
    assert "| dora:8 | 1 |" in text
    one_seed = study.markdown(study.aggregate({0: seeds[0]}))
    assert "not judged" in one_seed
    # --summarize reads the finished runs (the recipe's folder names) and trains nothing.
    for seed, runs in seeds.items():
        for r in runs:
            folder = tmp_path / f"seed-{seed}" / r["strategy"].replace(":", "-")
            folder.mkdir(parents=True)
            (folder / "results.json").write_text(json.dumps(r))
    args = type("Args", (), {"out": str(tmp_path), "configs": "full,lora:8,dora:8"})
    assert [r["strategy"] for r in study.finished_runs(1, args)] == ["full", "lora:8"]
