"""recipes/bert_text_classification.py: strategies, pooling, outputs; tiny random BERT.

The fast tests save a tiny random keras-hub BERT (hidden size 4) as a local
preset folder and run the recipe on generated text. One slow test runs it on
the real all-MiniLM-L6-v2 checkpoint and SST-2 phrases.
"""

import json
import os
import sys

import keras
import keras_hub
import numpy as np
import pytest

import keras_peft
from tests.conftest import DATA_DIR
from tests.helpers import VOCAB

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))

import bert_text_classification as recipe
from _text_classifier import (
    DEFAULT_PRESET,
    MeanPoolingBertClassifier,
    build_classifier,
    detect_pooling,
)

SST2 = os.path.join(DATA_DIR, "sst2", "train.tsv")
POSITIVE = ["good", "great", "fun"]
NEGATIVE = ["bad", "awful"]


def tiny_parts(sequence_length=8, seed=0):
    keras.utils.set_random_seed(seed)
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=VOCAB)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=sequence_length)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(VOCAB), num_layers=2, num_heads=2, hidden_dim=4,
        intermediate_dim=8, max_sequence_length=16)
    return backbone, preprocessor


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    """A local keras-hub preset folder holding a tiny random BERT and its preprocessor."""
    folder = str(tmp_path_factory.mktemp("tiny_bert"))
    backbone, preprocessor = tiny_parts()
    backbone.save_to_preset(folder)
    preprocessor.save_to_preset(folder)
    return folder


@pytest.fixture(scope="module")
def sentiment_file(tmp_path_factory):
    """Generated sentences from the tiny vocabulary, labelled by their adjective."""
    rng = np.random.default_rng(0)
    lines = ["sentence\tlabel"]
    for i in range(80):
        positive = i % 2 == 0
        word = rng.choice(POSITIVE if positive else NEGATIVE)
        lines.append(f"the movie was {word}\t{int(positive)}")
    path = tmp_path_factory.mktemp("data") / "train.tsv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ------------------------------------------------------------- strategies
@pytest.mark.parametrize("spec, expected", [
    ("full", ("full", None)), ("head_only", ("head_only", None)),
    ("top_layers:2", ("top_layers", 2)),
    ("lora:8", ("lora", recipe._common.LoraSpec(rank=8))),
    ("dora:4:all-linear", ("dora", recipe._common.LoraSpec(rank=4, variant="dora",
                                                           all_linear=True))),
    ("llrd:0.8", ("llrd", 0.8)), ("gradual", ("gradual", None)),
    ("gradual:5", ("gradual", 5)), ("auto", ("auto", None)),
    ("auto:0.02", ("auto", 0.02)), ("auto:50000", ("auto", 50000)),
    ("autofreeze", ("autofreeze", None)), ("lisa:3", ("lisa", 3)), ("plateau:2", ("plateau", 2)),
    ("rgn:25", ("rgn", 25)),
])
def test_parse_strategy(spec, expected):
    strategy = recipe.parse_strategy(spec)
    assert (strategy.name, strategy.arg) == expected
    assert ":" not in strategy.slug
    assert not strategy.cache


def test_parse_strategy_with_cache():
    strategy = recipe.parse_strategy("autofreeze:25+cache")
    assert (strategy.name, strategy.arg, strategy.cache) == ("autofreeze", 25, True)
    assert strategy.slug == "autofreeze-25+cache"
    assert recipe.parse_strategy("top_layers:2+cache").cache


@pytest.mark.parametrize("spec, message", [
    ("lora", r"lora needs an argument, e.g. lora:8"),
    ("lora:eight", r"the rank must be a positive integer, not 'eight'"),
    ("lora:8:qv", r"unknown option 'qv'"),
    ("llrd:1.5", r"the decay must be in \(0, 1\]"),
    ("bitfit:3", r"bitfit takes no argument"),
    ("prefix", r"unknown name 'prefix'. Choose from: full, head_only, top_layers:K"),
    ("top_layers:-1", r"-1 is out of range"),
    ("lisa+cache", r"\+cache caches a frozen bottom that only grows during training; give it "
                   r"to one of autofreeze, top_layers, head_only"),
    ("autofreeze+cache+cache", r"give it to one of autofreeze"),
])
def test_parse_strategy_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        recipe.parse_strategy(spec)


def test_detect_pooling(tmp_path):
    assert detect_pooling(DEFAULT_PRESET)[0] == "mean"
    assert detect_pooling("bert_tiny_en_uncased")[0] == "cls"
    assert detect_pooling("hf://sentence-transformers/all-MiniLM-L12-v2")[0] == "mean"
    (tmp_path / "1_Pooling").mkdir()
    config = tmp_path / "1_Pooling" / "config.json"
    config.write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert detect_pooling(str(tmp_path)) == (
        "mean", "the checkpoint's 1_Pooling/config.json (sentence-transformers)")
    config.write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert detect_pooling(str(tmp_path))[0] == "cls"


# ------------------------------------------------------------------ model
def test_mean_pooling_ignores_padding_and_takes_raw_strings(tmp_path):
    backbone, short = tiny_parts(sequence_length=8)
    model = MeanPoolingBertClassifier(backbone, num_classes=2, preprocessor=short)
    assert model.backbone is backbone
    texts = ["the movie was good", "awful"]
    logits_short = model.predict(texts, verbose=0)
    model.preprocessor = tiny_parts(sequence_length=16)[1]  # more padding, same tokens
    np.testing.assert_allclose(model.predict(texts, verbose=0), logits_short, atol=1e-5)

    # The same head on an unmasked mean would see the padding: check by hand.
    x = short(keras.ops.convert_to_tensor(texts))
    sequence = keras.ops.convert_to_numpy(backbone(x)["sequence_output"])
    mask = keras.ops.convert_to_numpy(x["padding_mask"])[..., None].astype("float32")
    pooled = (sequence * mask).sum(1) / mask.sum(1)
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in model.get_layer("logits").weights)
    np.testing.assert_allclose(pooled @ kernel + bias, logits_short, atol=1e-5)

    keras_peft.wrap(model, keras_peft.head_only(model))
    path = str(tmp_path / "mean.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, MeanPoolingBertClassifier) and keras_peft.is_wrapped(loaded)


def test_build_classifier_checks_pooling_and_sequence_length():
    backbone, preprocessor = tiny_parts()
    with pytest.raises(ValueError, match=r"`pooling` must be one of \('cls', 'mean'\)"):
        build_classifier("x", 2, pooling="max", sequence_length=8, backbone=backbone)
    with pytest.raises(ValueError, match=r"`sequence_length` must be in 2\.\.16"):
        build_classifier("x", 2, pooling="mean", sequence_length=64, backbone=backbone)
    model = build_classifier("x", 3, pooling="cls", sequence_length=8, backbone=backbone,
                             preprocessor=preprocessor)
    assert isinstance(model, keras_hub.models.BertTextClassifier)


def _trainable_layers(model):
    return {v.path.rsplit("/", 1)[0] for v in model.trainable_weights}


@pytest.mark.parametrize("spec", ["full", "head_only", "top_layers:1", "bitfit", "lora:2",
                                  "llrd:0.8", "gradual", "auto:0.5", "autofreeze:7",
                                  "plateau:2", "rgn"])
def test_every_strategy_freezes_the_unused_pooler_under_mean_pooling(spec):
    backbone, preprocessor = tiny_parts()
    model = MeanPoolingBertClassifier(backbone, num_classes=2, preprocessor=preprocessor)
    data = recipe.TextSplit(["the movie was good", "the movie was bad"] * 4,
                            np.array([1, 0] * 4, "int32"), "generated")
    train_ds = recipe.make_dataset(data, 4, shuffle=True, seed=0)
    rules, callbacks, info = recipe.strategy_rules(
        recipe.parse_strategy(spec), model, train_ds, pooling="mean", total_steps=20,
        verbose=0)
    keras_peft.wrap(model, rules)
    trainable = _trainable_layers(model)
    assert not any("pooled_dense" in p for p in trainable)
    assert "logits" in trainable  # the head always trains
    if spec == "head_only":
        assert trainable == {"logits"}
    if spec == "lora:2":
        adapters = {v.path for v in model.trainable_weights if "lora" in v.path}
        assert len(adapters) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    if spec == "bitfit":
        assert all(v.path.endswith(("bias", "beta")) or "logits" in v.path
                   for v in model.trainable_weights)
    if spec == "gradual":
        assert isinstance(callbacks[0], keras_peft.GradualUnfreezing)
        assert info["unfreeze_every_steps"] == 5  # 20 steps over 3 stages + the last
    if spec == "auto:0.5":
        assert info["auto_budget"] is not None
        assert keras_peft.report(model).trainable_fraction <= 0.5
    adaptive = {"autofreeze:7": (keras_peft.AutoFreeze, {"every_steps": 7}),
                "plateau:2": (keras_peft.UnfreezeOnPlateau, {"patience": 2,
                                                             "monitor_name": "val_loss"}),
                "rgn": (keras_peft.AdaptiveRGN, {"every_steps": recipe.ADAPTIVE_EVERY})}
    if spec in adaptive:
        kind, settings = adaptive[spec]
        (callback,) = callbacks
        assert isinstance(callback, kind)
        assert {k: v for k, v in info["adaptive"].items() if k in settings} == settings


def test_step_timer_leaves_out_steps_that_retraced():
    from tests.conftest import tiny_mlp

    model = keras_peft.wrap(tiny_mlp(), {".*": keras_peft.Rule()})
    timer = recipe.StepTimer()
    timer.set_model(model)
    for step in range(5):
        if step == 3:  # e.g. GradualUnfreezing at a stage change
            model.set_rules({".*block_0/.*": keras_peft.Rule(trainable=False),
                             ".*": keras_peft.Rule()})
        timer.on_train_batch_begin(step)
        timer.on_train_batch_end(step)
    assert timer.traced == [True, False, False, True, False]
    summary = timer.summary()
    assert summary["steps"] == 5 and summary["traced_steps"] == 2


def test_step_timer_does_not_count_a_live_lr_scale_change_as_a_retrace():
    """Auto-RGN's re-estimations change live scales: the step keeps its trace."""
    from keras_peft.state import state_of
    from tests.conftest import tiny_mlp

    model = keras_peft.wrap(tiny_mlp(), {".*": keras_peft.Rule()})
    path = model.get_layer("block_1").kernel.path
    state_of(model).make_live(model, [path])
    timer = recipe.StepTimer()
    timer.set_model(model)
    for step in range(4):
        if step == 2:  # a re-estimated scale: the rules change, the trace does not
            model.set_rules({path: keras_peft.Rule(lr_scale=0.5), ".*": keras_peft.Rule()})
        timer.on_train_batch_begin(step)
        timer.on_train_batch_end(step)
    assert keras_peft.get_rules(model)[path].lr_scale == 0.5
    assert timer.traced == [True, False, False, False]


# ------------------------------------------------------------ end to end
def test_compare_runs_writes_results_deltas_table_and_chart(tiny_preset, sentiment_file,
                                                             tmp_path, capsys):
    out = str(tmp_path / "out")
    results = recipe.main([
        "--preset", tiny_preset, "--data", sentiment_file, "--compare", "bitfit,lora:2",
        "--pooling", "mean", "--sequence-length", "12", "--batch-size", "8", "--no-xla",
        "--output-dir", out, "--verbose", "0"])
    printed = capsys.readouterr().out
    assert "sequence length 12 (preprocessor)" in printed
    assert "validation before training: accuracy" in printed
    runs = results["runs"]
    assert [r["strategy"] for r in runs] == ["bitfit", "lora:2"]
    for run in runs:
        with open(os.path.join(out, run["strategy"].replace(":", "-"), "results.json")) as f:
            saved = json.load(f)
        assert saved["val_accuracy"] == run["val_accuracy"]
        assert saved["pooling"] == "mean" and saved["sequence_length"] == 12
        assert saved["steps"] == 8 and saved["mean_step_s"] > 0
        assert saved["peak_rss_mb"] > 0 and saved["settings"]["train_examples"] == 64
        assert 0 < saved["trainable_params"] < saved["total_params"]
        assert np.isfinite(saved["val_loss"]) and saved["accuracy_before"] > 0
    # The deltas hold exactly what each strategy trained.
    bitfit = keras_peft.load_delta(_fresh(tiny_preset), runs[0]["delta_path"])
    assert {v.path for v in bitfit.trainable_weights} == {
        v.path for v in bitfit.weights
        if v.path.endswith(("bias", "beta")) and "pooled_dense" not in v.path
    } | {"logits/kernel"}
    lora = keras_peft.load_delta(_fresh(tiny_preset), runs[1]["delta_path"])
    assert keras_peft.report(lora).trainable_params == runs[1]["trainable_params"]

    with open(os.path.join(out, "comparison.md")) as f:
        table = f.read()
    assert "| bitfit | 0.001 |" in table and "| lora:2 | 0.001 |" in table
    with open(os.path.join(out, "comparison.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "comparison.json")) as f:
        assert len(json.load(f)["runs"]) == 2
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_mixed_precision_is_on_during_the_runs_and_restored_after(monkeypatch, sentiment_file,
                                                                  tmp_path):
    seen = []

    def fake_run(strategy, args, data, preset, pooling, reason, settings):
        seen.append((strategy.spec, keras.mixed_precision.dtype_policy().name, args.xla))
        raise RuntimeError("stop here")

    monkeypatch.setattr(recipe, "run_strategy", fake_run)
    with pytest.raises(RuntimeError, match="stop here"):
        recipe.main(["--data", sentiment_file, "--preset", str(tmp_path), "--strategy", "bitfit",
                     "--mixed-precision", "--no-xla"])
    assert seen == [("bitfit", "mixed_float16", False)]
    assert keras.mixed_precision.dtype_policy().name == "float32"


def test_resume_after_a_crash_ends_like_an_uninterrupted_run(tiny_preset, sentiment_file,
                                                             tmp_path, monkeypatch, capsys):
    """--resume: a run killed mid-epoch and run again ends with the uninterrupted run's weights."""
    def argv(out, *extra):
        return ["--preset", tiny_preset, "--data", sentiment_file, "--strategy", "lora:2",
                "--pooling", "mean", "--sequence-length", "12", "--batch-size", "8",
                "--no-xla", "--epochs", "2", "--verbose", "0", "--output-dir", str(out), *extra]

    backups = tmp_path / "backups"
    resume = ["--resume", str(backups), "--backup-every", "3", "--skip-nonfinite"]
    reference = recipe.main(argv(tmp_path / "reference", *resume))  # not interrupted
    assert reference["resumed_at"] is None and reference["skipped_steps"] == 0
    assert reference["steps"] == 16 and not os.path.exists(backups / "lora-2")  # deleted
    original_end = recipe.StepTimer.on_train_batch_end

    def crash_at_step_11(self, batch, logs=None):  # 8 steps an epoch: epoch 2, batch 3
        original_end(self, batch, logs)
        if int(self.model.optimizer.iterations) == 11:
            raise KeyboardInterrupt  # stands in for a killed process

    monkeypatch.setattr(recipe.StepTimer, "on_train_batch_end", crash_at_step_11)
    with pytest.raises(KeyboardInterrupt):
        recipe.main(argv(tmp_path / "crashed", *resume))
    with open(backups / "lora-2" / "backup.json") as f:
        assert json.load(f)["current"]["epoch"] == 1  # the backup after step 9
    monkeypatch.setattr(recipe.StepTimer, "on_train_batch_end", original_end)
    capsys.readouterr()

    resumed = recipe.main(argv(tmp_path / "resumed", *resume))
    assert "resuming from the backup in" in capsys.readouterr().out
    assert resumed["resumed_at"] == [1, 1] and resumed["skipped_steps"] == 0
    assert resumed["steps"] == 7  # 16 steps, 9 of them before the backup
    assert not os.path.exists(backups / "lora-2" / "backup.json")  # deleted when done
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-6)
    models = [keras_peft.load_delta(_fresh(tiny_preset), run["delta_path"])
              for run in (reference, resumed)]
    weights = [{v.path: v.numpy() for v in model.weights} for model in models]
    assert weights[0].keys() == weights[1].keys()
    for path, value in weights[0].items():
        np.testing.assert_allclose(weights[1][path], value, rtol=1e-6, atol=1e-7, err_msg=path)
    # ... and training did move the adapters: the comparison is not of two untouched models.
    untouched = {v.path: v.numpy() for v in _fresh(tiny_preset).weights}
    assert any(not np.allclose(value, untouched[path]) for path, value in weights[0].items()
               if path in untouched)



def test_resumed_comparison_reuses_the_strategies_that_had_finished(
        tiny_preset, sentiment_file, tmp_path, monkeypatch, capsys):
    argv = ["--preset", tiny_preset, "--data", sentiment_file, "--compare", "bitfit,lora:2",
            "--pooling", "mean", "--sequence-length", "12", "--batch-size", "8", "--no-xla",
            "--verbose", "0", "--output-dir", str(tmp_path / "out"),
            "--resume", str(tmp_path / "backups")]
    real_run = recipe.run_strategy

    def crash_in_lora(strategy, *args):
        if strategy.name == "lora":
            raise KeyboardInterrupt  # stands in for a killed process
        return real_run(strategy, *args)

    monkeypatch.setattr(recipe, "run_strategy", crash_in_lora)
    with pytest.raises(KeyboardInterrupt):
        recipe.main(argv)
    monkeypatch.setattr(recipe, "run_strategy", real_run)
    with open(tmp_path / "out" / "bitfit" / "results.json") as f:
        first = json.load(f)
    capsys.readouterr()

    runs = recipe.main(argv)["runs"]
    printed = capsys.readouterr().out
    assert "bitfit: finished in an earlier run of this command (--resume)" in printed
    assert "lora:2: finished" not in printed
    assert [r["strategy"] for r in runs] == ["bitfit", "lora:2"]
    assert runs[0] == first  # reused as written, not trained again
    # Other settings (here the seed) are another command: nothing is reused.
    args = recipe.parse_args([*argv, "--seed", "1"])
    settings = {**first["settings"], "seed": 1}
    assert recipe._finished_run(recipe.parse_strategy("bitfit"), args, settings) is None
    assert recipe._finished_run(recipe.parse_strategy("bitfit"), args,
                                first["settings"]) == first


def test_adaptive_strategies_record_their_decisions_and_epochs(tiny_preset, sentiment_file,
                                                               tmp_path):
    out = str(tmp_path / "out")
    lisa = recipe.main([
        "--preset", tiny_preset, "--data", sentiment_file, "--strategy", "lisa:1",
        "--pooling", "mean", "--sequence-length", "12", "--batch-size", "8", "--no-xla",
        "--epochs", "2", "--output-dir", out, "--verbose", "0", "--no-save-delta"])
    assert [e["epoch"] for e in lisa["epochs"]] == [1, 2]
    assert all("val_accuracy" in e and e["train_time_s"] > 0 for e in lisa["epochs"])
    # LISA: 16 steps, a draw every 50: one draw, of one of the 2 blocks.
    assert [(d["action"], len(d["groups"])) for d in lisa["decisions"]] == [("sample", 1)]
    assert lisa["adaptive"] == {"every_steps": 50, "num_blocks": 1}
    assert lisa["trainable_params_end"] < lisa["trainable_params"]


def test_cached_strategy_trains_on_the_cache_and_counts_its_time(tiny_preset, sentiment_file,
                                                                  tmp_path):
    argv = ["--preset", tiny_preset, "--data", sentiment_file, "--pooling", "mean",
            "--sequence-length", "12", "--batch-size", "8", "--no-xla", "--epochs", "3",
            "--output-dir", str(tmp_path / "out"), "--verbose", "0", "--no-save-delta"]
    result = recipe.main([*argv, "--strategy", "top_layers:1+cache"])
    # Frozen from the start: the embeddings and block 0 are cached before epoch 1.
    (step,) = result["prefix_cache"]
    assert step["epoch"] == 0 and "transformer_layer_0" in step["prefix_layers"]
    assert step["cut"] == ["padding_mask", "transformer_layer_0"]
    assert step["num_examples"] == 8 * len(result["step_times_s"]) // 3
    # The caching time is training time: in every epoch's cumulative time.
    epochs = result["epochs"]
    assert epochs[0]["train_time_s"] == pytest.approx(
        sum(result["step_times_s"][:len(result["step_times_s"]) // 3]) + step["seconds"],
        abs=0.01)
    assert [e["epoch"] for e in epochs] == [1, 2, 3] and all("val_accuracy" in e for e in epochs)
    assert result["val_accuracy"] == pytest.approx(epochs[-1]["val_accuracy"])
    for flag in ("--resume", "--distribution"):
        extra = [flag, str(tmp_path / "backup")] if flag == "--resume" else [flag, "mirrored"]
        with pytest.raises(SystemExit, match="fit_cached, which cannot"):
            recipe.main([*argv, "--strategy", "autofreeze+cache", *extra])


def test_quantize_int8_trains_float_adapters_on_int8_kernels(tiny_preset, sentiment_file,
                                                             tmp_path):
    out = str(tmp_path / "out")
    result = recipe.main([
        "--preset", tiny_preset, "--data", sentiment_file, "--strategy", "lora:2:all-linear",
        "--pooling", "mean", "--sequence-length", "12", "--batch-size", "8", "--no-xla",
        "--output-dir", out, "--verbose", "0", "--quantize", "int8"])
    assert result["settings"]["quantize"] == "int8"
    import safetensors

    with safetensors.safe_open(result["delta_path"], "np") as f:
        saved = list(f.keys())
    assert saved and all("lora_kernel" in k or k.startswith("logits/") for k in saved), saved


# ------------------------------------------------------------ task adapters
@pytest.fixture(scope="module")
def second_task_file(tmp_path_factory):
    """The same kind of sentences, labelled by another rule: 'the movie was' vs 'the was'."""
    rng = np.random.default_rng(1)
    lines = ["sentence\tlabel"]
    for i in range(80):
        word = rng.choice(POSITIVE + NEGATIVE)
        lines.append(("the movie was " if i % 2 else "the was ") + f"{word}\t{i % 2}")
    path = tmp_path_factory.mktemp("data2") / "train.tsv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _task_argv(preset, data, out, *extra):
    return ["--preset", preset, "--data", data, "--strategy", "lora:2:all-linear",
            "--pooling", "mean", "--sequence-length", "12", "--batch-size", "8", "--no-xla",
            "--epochs", "2", "--output-dir", out, "--verbose", "0", *extra]


def test_task_adapters_train_apart_load_together_and_each_keeps_its_accuracy(
        tiny_preset, sentiment_file, second_task_file, tmp_path):
    out = str(tmp_path / "tasks")
    first = recipe.main(_task_argv(tiny_preset, sentiment_file, out, "--adapter", "sentiment"))
    path = os.path.join(out, "sentiment", "adapter.safetensors")
    assert first["delta_path"] == path and first["adapter_name"] == "sentiment"
    assert first["task"]["data"] == os.path.abspath(sentiment_file)
    assert first["lora_targets"] == "all-linear, logits"
    import safetensors

    with safetensors.safe_open(path, "np") as f:  # the adapter alone, the head's included
        saved = {k: f.get_tensor(k).size for k in f.keys()}  # noqa: SIM118 (not a dict)
    assert saved and all(k.endswith("__sentiment") for k in saved), saved
    assert any(k.startswith("logits/") for k in saved)
    assert first["trainable_params"] == sum(saved.values())  # nothing else trained

    second = recipe.main(_task_argv(tiny_preset, second_task_file, out, "--adapter", "topic",
                                    "--load-adapter", path))
    rows = {r["adapter"]: r for r in second["adapters"]}
    assert set(rows) == {"sentiment", "topic"}
    # the loaded adapter did not train while `topic` did, and computes as it did when trained
    assert rows["sentiment"]["val_accuracy"] == pytest.approx(first["val_accuracy"], abs=1e-6)
    assert rows["sentiment"]["accuracy_at_training"] == first["val_accuracy"]
    assert rows["topic"]["val_accuracy"] == pytest.approx(second["val_accuracy"], abs=1e-6)
    assert rows["topic"]["validation_examples"] == 16
    with safetensors.safe_open(second["delta_path"], "np") as f:
        assert all(k.endswith("__topic") for k in f.keys())  # noqa: SIM118

    both = recipe.main(["--preset", tiny_preset, "--pooling", "mean", "--sequence-length", "12",
                        "--no-xla", "--output-dir", str(tmp_path / "eval"), "--verbose", "0",
                        "--load-adapter", path, "--load-adapter", second["delta_path"]])
    for row in both["adapters"]:  # a fresh process-like base: same accuracies, nothing trains
        expected = first if row["adapter"] == "sentiment" else second
        assert row["val_accuracy"] == pytest.approx(expected["val_accuracy"], abs=1e-6)
    assert os.path.exists(str(tmp_path / "eval" / "adapters.json"))
    # serving, as docs/recipes/bert.md shows: a fresh base, the files, switch, merge
    import _task_adapters

    served = _fresh(tiny_preset)
    _task_adapters.fixed_head(served)
    for file in (path, second["delta_path"]):
        keras_peft.load_delta(served, file)
    texts = ["the movie was fun", "the was awful"]
    keras_peft.set_adapter(served, "sentiment")
    before = served.predict(texts, verbose=0)
    keras_peft.merge(served, adapter="sentiment")
    np.testing.assert_allclose(served.predict(texts, verbose=0), before, atol=1e-5)
    keras_peft.unmerge(served, adapter="sentiment")
    keras_peft.set_adapter(served, "topic")
    assert np.abs(served.predict(texts, verbose=0) - before).max() > 1e-4
    with pytest.raises(SystemExit, match=r"trained on another base \(sequence_length: 12 "
                                         r"there, 16 here\)"):
        recipe.main(["--preset", tiny_preset, "--pooling", "mean", "--sequence-length", "16",
                     "--load-adapter", path, "--output-dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match=r"adapter name\(s\) \['sentiment'\] given twice"):
        recipe.main(_task_argv(tiny_preset, sentiment_file, str(tmp_path / "y"),
                               "--adapter", "sentiment", "--load-adapter", path))


@pytest.mark.parametrize("extra, message", [
    (["--strategy", "bitfit"], "with --strategy bitfit: it adds no adapter"),
    (["--strategy", "lora:2:bias"], r"biases/norms \(:bias, :norm\) would train the shared"),
    (["--strategy", "lora:2:keras"], "Keras' own LoRA"),
    (["--compare", "lora:2,dora:2"], "give one --strategy, not --compare"),
    (["--adapter", "a__b"], "An adapter name must be a string of letters"),
    (["--load-adapter", "nowhere.safetensors"], "no such file"),
])
def test_task_adapter_options_refuse_what_cannot_work(extra, message, sentiment_file, tmp_path):
    argv = ["--data", sentiment_file, "--output-dir", str(tmp_path)]
    argv += [] if "--adapter" in extra or "--load-adapter" in extra else ["--adapter", "t"]
    with pytest.raises(SystemExit, match=message):
        recipe.main(argv + extra)


def test_load_adapter_needs_the_results_of_a_run_with_adapter(tiny_preset, sentiment_file,
                                                              tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "delta.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="cannot read the results.json beside it"):
        recipe.main(["--load-adapter", str(plain / "delta.safetensors")])
    (plain / "results.json").write_text(json.dumps({"strategy": "lora:2"}))
    with pytest.raises(SystemExit, match="is from a run without --adapter"):
        recipe.main(["--load-adapter", str(plain / "delta.safetensors")])


def test_backup_every_needs_resume(sentiment_file):
    with pytest.raises(SystemExit):
        recipe.parse_args(["--backup-every", "5"])


def _fresh(preset):
    keras.backend.clear_session()
    return build_classifier(preset, 2, pooling="mean", sequence_length=12)


@pytest.mark.parametrize("argv, message", [
    (["--strategy", "lora"], "lora needs an argument"),
    (["--compare", "bitfit,bitfit"], "named twice"),
    (["--data", "missing.tsv"], "Data file not found: 'missing.tsv'"),
    (["--preset", "./no/such/folder"], "Preset folder './no/such/folder' does not exist"),
])
def test_cli_errors_are_clear(argv, message, sentiment_file):
    argv = ["--data", sentiment_file, *argv] if "--data" not in argv else argv
    with pytest.raises(SystemExit, match=message):
        recipe.main(argv)


def test_unreachable_tfds_download_fails_fast_or_falls_back(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("socket.create_connection", refuse)
    why = recipe.tfds_unreachable("tfds:glue/sst2")
    assert why is not None and why.startswith("glue/sst2 is not prepared") and "no network" in why
    with pytest.raises(SystemExit, match="use a local CSV/TSV file, e.g. --data"):
        recipe.main(["--data", "tfds:glue/sst2", "--output-dir", str(tmp_path)])


# ------------------------------------------------------------------- slow
@pytest.mark.slow
def test_minilm_on_sst2_beats_chance(tmp_path):
    if not os.path.exists(SST2):
        pytest.skip(f"SST-2 not found at {SST2}")
    from _pretrained import minilm_path  # recipes/

    try:
        minilm_path(verbose=False)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        pytest.skip(f"all-MiniLM-L6-v2 not available: {e}")
    result = recipe.main([
        "--data", SST2, "--max-examples", "768", "--max-validation-examples", "400",
        "--strategy", "head_only", "--batch-size", "16", "--sequence-length", "32",
        "--no-xla", "--output-dir", str(tmp_path), "--verbose", "0"])
    assert result["pooling"] == "mean" and result["sequence_length"] == 32
    assert result["trainable_params"] == 384 * 2 + 2
    majority = 0.56  # SST-2's positive share; the held-out 400 are within a few points
    assert result["val_accuracy"] > majority + 0.1, result
    assert result["val_accuracy"] > result["accuracy_before"] + 0.1, result
