"""What docs/recipes/*.md and docs/reliability.md promise about the recipes' defaults and
flags.

Each test quotes the sentence it checks. Claims that other tests already assert
(tests/test_recipe_bert.py, test_recipe_text_data.py, test_two_tower_recommender.py,
test_image_segmentation.py, test_determinism.py, ...) are not repeated.
"""

import os
import sys

import numpy as np

import keras_peft

RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")
if RECIPES not in sys.path:
    sys.path.insert(0, RECIPES)

import _movielens as ml  # noqa: E402
import bert_text_classification as bert  # noqa: E402
import image_segmentation as segmentation  # noqa: E402
import two_tower_recommender as recommender  # noqa: E402


# --------------------------------------------------------------------- BERT
def test_bert_recipe_defaults_are_those_of_its_options_table():
    """recipes/bert.md:82-100, the options table: `--preset` all-MiniLM-L6-v2, `--data`
    tfds:glue/sst2, `--strategy` lora:8, `--epochs`, `--batch-size` 1, 32, `--schedule`,
    `--warmup` cosine, 0.1, `--weight-decay`, `--dropout` 0.01, 0.1, `--sequence-length`
    64, `--seed` 0, `--output-dir` runs/bert_text_classification, `--xla` on,
    `--verbose` 1, `--mixed-precision` on with a GPU; recipes/bert.md:76:
    `--validation-fraction`, default 0.2."""
    args = bert.parse_args([])
    assert args.preset == "all-MiniLM-L6-v2"
    assert args.data is None and bert.DEFAULT_DATA == "tfds:glue/sst2"  # None: that, if reachable
    assert (args.strategy, args.epochs, args.batch_size) == ("lora:8", 1, 32)
    assert (args.schedule, args.warmup) == ("cosine", 0.1)
    assert (args.weight_decay, args.dropout) == (0.01, 0.1)
    assert (args.sequence_length, args.seed, args.verbose) == (64, 0, 1)
    assert args.output_dir == os.path.join("runs", "bert_text_classification")
    assert args.xla is True and args.mixed_precision is None  # None: on when there is a GPU
    assert (args.validation_fraction, args.split_seed) == (0.2, 0)
    assert args.learning_rate is None  # per strategy, below


def test_bert_recipe_usual_learning_rates_are_those_of_its_table():
    """recipes/bert.md:122-135: full 5e-5, llrd 1e-4, top_layers 1e-4, gradual 1e-4,
    auto 1e-3, lora (dora, pissa) 1e-3, bitfit 1e-3, head_only 1e-2, autofreeze 5e-5,
    lisa 1e-4, plateau 1e-4, rgn 1e-3."""
    assert bert.LEARNING_RATES == {"full": 5e-5, "llrd": 1e-4, "top_layers": 1e-4,
                                   "gradual": 1e-4, "auto": 1e-3, "lora": 1e-3,
                                   "dora": 1e-3, "pissa": 1e-3,
                                   "bitfit": 1e-3, "head_only": 1e-2, "autofreeze": 5e-5,
                                   "lisa": 1e-4, "plateau": 1e-4, "rgn": 1e-3}


# --------------------------------------------------------------- skip_nonfinite
def test_bert_and_segmentation_recipes_take_skip_nonfinite_off_by_default():
    """reliability.md: "The quickstart turns it on; the BERT and segmentation recipes take
    `--skip-nonfinite` (off by default ...)." (The quickstart: tests/test_determinism.py.)"""
    for parse_args in (bert.parse_args, segmentation.parse_args):
        assert parse_args([]).skip_nonfinite is False
        assert parse_args(["--skip-nonfinite"]).skip_nonfinite is True
    assert parse_args(["--no-skip-nonfinite"]).skip_nonfinite is False


# -------------------------------------------------------------- segmentation
def test_segmentation_recipe_split_defaults_and_gpu_defaults(monkeypatch):
    """recipes/segmentation.md:53-54: "Validation is a deterministic split
    (`--validation-split 0.2`, `--split-seed 0`)"; recipes/segmentation.md:181-182: "On a
    GPU, mixed precision (`mixed_float16`) and XLA are on by default
    (`--no-mixed-precision`, `--no-jit-compile`)." """
    args = segmentation.parse_args([])
    assert (args.validation_split, args.split_seed) == (0.2, 0)
    tf = segmentation.tf
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    assert segmentation._device_options(args) == (True, True)
    off = segmentation.parse_args(["--no-mixed-precision", "--no-jit-compile"])
    assert segmentation._device_options(off) == (False, False)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert segmentation._device_options(args) == (False, False)


# --------------------------------------------------------------- recommender
def test_recommender_recipe_defaults_are_those_its_page_gives():
    """recipes/recommender.md: `tfds:movielens/100k-ratings` (the default) (26); the
    default `--split time` (43); `--cutoff` (default `0.8` ...) (45); `--adapt-fraction
    0.5` (48); batch 256, Adagrad 0.1 and the logQ correction on by default (66-68);
    `--adapt-epochs 5`, `--epochs 5` (83-84); `--output-dir` (default
    `runs/two_tower_recommender`) (197); `--strategy NAME` (default `query_tower`) (206);
    `tower_lr` at 0.1 x the learning rate and rank-4 `lora_embeddings` (94-95)."""
    args = recommender.parse_args([])
    assert args.data == "tfds:movielens/100k-ratings"
    assert (args.split, args.cutoff, args.adapt_fraction) == ("time", "0.8", 0.5)
    assert (args.batch_size, args.learning_rate, args.adapt_learning_rate) == (256, 0.1, 0.1)
    assert args.logq is True
    assert (args.epochs, args.adapt_epochs) == (5, 5)
    assert args.output_dir == os.path.join("runs", "two_tower_recommender")
    assert args.strategy == "query_tower" and args.strategies == ["none", "query_tower"]
    assert (args.candidate_lr_scale, args.lora_rank) == (0.1, 4)


def test_user_embeddings_strategy_moves_only_the_users_of_the_adaptation_data():
    """recipes/recommender.md:97-99: "With `user_embeddings`, only users who appear in the
    adaptation data get gradients (embedding gradients are sparse), so it adapts exactly
    the new and active users and leaves everyone else, and every movie, untouched." """
    args = recommender.parse_args(["--data", "synthetic", "--id-dim", "8",
                                   "--embedding-dim", "8", "--verbose", "0"])
    data = ml.synthetic(num_users=30, num_items=40, num_ratings=600)
    parts = ml.split(data)
    vocab = recommender.build_vocabulary(data, parts, 100)
    model = recommender.build_model(vocab, args, seed=0)
    keras_peft.wrap(model, recommender.strategy_rules("user_embeddings", model, args))
    paths = keras_peft.variable_paths(model)
    table = model.weights[paths.index("query/user_embedding/embeddings")]
    before = {p: v.numpy().copy() for p, v in zip(paths, model.weights)}
    recommender.train(model, recommender.make_dataset(data, parts.adapt, 64, 0), 1, 0.1, 0)
    moved = {p for p, v in zip(paths, model.weights) if not np.array_equal(before[p], v.numpy())}
    assert moved == {"query/user_embedding/embeddings"}
    rows = np.flatnonzero(np.abs(table.numpy() - before[
        "query/user_embedding/embeddings"]).max(axis=1))
    adapted_users = np.unique(data.user[parts.adapt])
    expected = np.unique(model.query_model.user_lookup(adapted_users).numpy())
    assert rows.tolist() == expected.tolist()
    assert 0 < len(rows) < table.shape[0]  # some users moved, the others did not


# ------------------------------------------------------- segmentation experiment
def test_segmentation_page_quotes_its_experiment_results():
    """docs/recipes/segmentation.md, "What this shows" and "The adaptive candidates": the
    numbers quoted are those of bench/results/segmentation_surgical_vgg16.json."""
    root = os.path.join(os.path.dirname(__file__), "..")
    import json

    with open(os.path.join(root, "bench", "results", "segmentation_surgical_vgg16.json")) as f:
        rows = {(r["corruption"], r["strategy"]): r for r in json.load(f)["rows"]
                if r["status"] == "run"}
    with open(os.path.join(root, "docs", "recipes", "segmentation.md")) as f:
        page = " ".join(f.read().split())

    def iou(corruption, strategy):
        m = rows[(corruption, strategy)]["mean_iou"]
        return f"{m['mean']:.3f} ± {m['std']:.3f}"

    def vs_full(corruption, strategy):
        v = rows[(corruption, strategy)]["vs_full"]
        return f"{v['mean']:+.3f} ± {v['std']:.3f}".replace("-", "\N{MINUS SIGN}"), v["better"]

    def memory(strategy):
        return [round(rows[(c, strategy)]["peak_tensor_mib"]["mean"])
                for c in ("gaussian_noise:0.2", "blur:1")]

    blur, noise = "blur:1", "gaussian_noise:0.2"
    # the first block under blur: the best of all, better than full with each seed
    best = max((r["mean_iou"]["mean"], s) for (c, s), r in rows.items() if c == blur)
    assert best[1] == "surgical" and vs_full(blur, "surgical")[1] == 3
    assert f"best mean IoU, {iou(blur, 'surgical')} (none: " in page
    assert f"full fine-tuning ({iou(blur, 'full')}) with each of the three seeds" in page
    # ... and the worst under noise
    worst = min((r["mean_iou"]["mean"], s) for (c, s), r in rows.items() if c == noise)
    assert worst[1] == "surgical"
    assert f"*worst* strategy, {iou(noise, 'surgical')}, below not adapting" in page
    # the adaptive candidates: none beat full under blur in any seed, nor the first block
    for strategy in ("autofreeze", "lisa", "plateau", "rgn"):
        assert vs_full(blur, strategy)[1] == 0
        assert rows[(blur, strategy)]["mean_iou"]["mean"] < rows[(blur, "surgical")][
            "mean_iou"]["mean"]
    delta, _ = vs_full(blur, "autofreeze")
    assert f"Under blur it ended at {iou(blur, 'autofreeze')}, below full fine-tuning ({delta})" \
        in page
    assert f"Under noise, {iou(noise, 'autofreeze')}." in page
    delta, _ = vs_full(blur, "lisa")
    assert (f"{iou(blur, 'lisa')} under blur ({delta} against full), {iou(noise, 'lisa')} "
            "under noise") in page
    # LISA's peak: the highest of all
    lisa, full = memory("lisa"), memory("full")
    assert all(max(memory(s)) < min(lisa) for (c, s) in rows if s != "lisa")
    assert (f"highest of all, {min(lisa)} to {max(lisa)} MiB against full fine-tuning's "
            f"{min(full)} to {max(full)}") in page
    # plateau: 5 of 6 runs matched the decoder (it trained the decoder alone)
    matched = [c for c in (noise, blur) if rows[(c, "plateau")]["mean_iou"]["values"] ==
               rows[(c, "decoder")]["mean_iou"]["values"]]
    assert matched == [blur]  # under noise, one seed unfroze a block
    same = sum(a == b for a, b in zip(rows[(noise, "plateau")]["mean_iou"]["values"],
                                      rows[(noise, "decoder")]["mean_iou"]["values"]))
    assert same == 2
    # rgn: second under noise, after auto
    order = sorted(((r["mean_iou"]["mean"], s) for (c, s), r in rows.items() if c == noise),
                   reverse=True)
    assert [s for _, s in order[:2]] == ["auto", "rgn"]
    assert f"second under noise, after `auto`: {iou(noise, 'rgn')}" in page
