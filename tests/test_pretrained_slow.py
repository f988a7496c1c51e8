"""Slow tests on the real all-MiniLM-L6-v2 checkpoint (skipped when it cannot be had)."""

import os
import sys

import pytest

import keras_peft

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_folder():
    from _pretrained import minilm_path  # recipes/_pretrained.py

    try:
        return minilm_path(verbose=False)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        pytest.skip(f"all-MiniLM-L6-v2 not available: {e}")


def _classifier(folder):
    import keras_hub

    return keras_hub.models.BertTextClassifier.from_preset(
        folder, num_classes=2, preprocessor=None, load_weights=True)


@pytest.mark.parametrize("strategy", ["lora8", "bitfit"])
def test_delta_is_under_two_percent_of_full_weights(minilm_folder, tmp_path, strategy):
    model = _classifier(minilm_folder)
    full = tmp_path / "full.weights.h5"
    model.save_weights(str(full))
    if strategy == "lora8":
        rules = keras_peft.lora(model, rank=8, targets=r".*(query|value)")
    else:
        rules = keras_peft.bitfit(model)
    keras_peft.wrap(model, rules)
    delta = tmp_path / "delta.safetensors"
    keras_peft.save_delta(model, str(delta))
    ratio = os.path.getsize(delta) / os.path.getsize(full)
    print(f"{strategy}: delta {os.path.getsize(delta):,} B / full {os.path.getsize(full):,} B"
          f" = {100 * ratio:.2f} %")
    assert ratio < 0.02
    restored = keras_peft.load_delta(_classifier(minilm_folder), str(delta))
    assert keras_peft.report(restored).trainable_params == keras_peft.report(
        model).trainable_params


def test_adapter_lifecycle_bench_runs_and_reloads_exactly(minilm_folder, tmp_path):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "bench", "adapter_lifecycle.py")
    spec = importlib.util.spec_from_file_location("adapter_lifecycle", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--repeats", "2", "--sequence-length", "16", "--out", str(tmp_path)])
    assert result["reloaded_max_abs_difference"] == 0.0 and result["outputs_differ"]
    assert all(r < 0.02 for r in result["delta_over_base"].values())
    assert os.path.exists(tmp_path / "results.json")


def test_quantized_base_bench_runs_and_int8_weights_are_smaller(minilm_folder, tmp_path):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "bench", "quantized_base.py")
    spec = importlib.util.spec_from_file_location("quantized_base", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--steps", "1", "--batch-size", "2", "--sequence-length", "8",
                         "--out", str(tmp_path)])
    apart = result["memory_apart"]  # each trained in a process of its own
    for kind in ("float32", "int8"):
        assert apart[kind]["process_peak_mb"] >= apart[kind]["resident_after_build_mb"] > 100
    for key in ("no_xla", "xla"):
        assert result[key]["int8_over_float32_weights"] < 0.3
        assert result[key]["int8"]["trainable_params"] == result[key]["float32"][
            "trainable_params"]
