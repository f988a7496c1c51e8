"""Two-tower movie recommender (TFRS or keras-rs), pretrained on the past, adapted to the present.

    python recipes/two_tower_recommender.py --data ../shared/data/movielens-latest-small
    python recipes/two_tower_recommender.py --data ../shared/data/movielens-latest-small \\
        --compare all --seeds 0,1,2
    python recipes/two_tower_recommender.py --framework tfrs --data ...   # TFRS, tf.keras 2
    python recipes/two_tower_recommender.py            # tfds:movielens/100k-ratings (online)

A two-tower retrieval model: the **query tower** embeds the user id (plus,
with `--query-features timestamp`, the time of the request); the
**candidate tower** embeds the movie id, its title (words, averaged) and its
genres, and projects both to one space. It is trained with an in-batch
softmax and evaluated against every movie of the catalogue.

`--framework` picks the library it is built with, the same model either way
(same layers, names, initialisers, loss, optimizer, data and evaluation):

- `keras-rs` (the default when `keras_rs` imports): Keras 3 models, the
  retrieval loss written with keras-rs' `SamplingProbabilityCorrection` and
  `RemoveAccidentalHits`, recommendations from `BruteForceRetrieval`. No
  `TF_USE_LEGACY_KERAS`: keras_peft wraps the Keras 3 model directly.
- `tfrs`: tensorflow-recommenders 0.7.7 (`tfrs.Model`, `tfrs.tasks.Retrieval`
  with `FactorizedTopK`), which needs Keras 2 as `tf.keras`: the recipe sets
  `TF_USE_LEGACY_KERAS=1` before it imports TensorFlow.

The scenario keras-peft is for: a model trained on the past must serve the
present. With the default **time split** the model is pretrained on ratings
before a cut-off (`--cutoff`, a quantile of the timestamps or a date); the
later ratings are divided per user in time order into adaptation data (each
user's first half) and evaluation data (the rest). Most users of the later
period are new, many of its movies too. Then, from the same pretrained
weights, each strategy adapts the model to the adaptation data and is scored
on the same evaluation data:

- `none`: no adaptation (the pretrained model as it is);
- `full_retrain`: a fresh model trained on everything up to evaluation, for
  as many epochs as pretraining (the expensive baseline);
- `full_finetune`: every variable trains on the adaptation data;
- `query_tower`: the candidate tower is frozen, the query tower trains;
- `user_embeddings`: only the user-id embedding table trains (only users
  with adaptation ratings get gradients: the new and active users);
- `new_id_embeddings`: only the rows of the user and movie id tables whose
  ids have no rating before the cut-off train (a row mask: the other rows
  stay bit-identical);
- `tower_lr`: everything trains, the candidate tower at `--candidate-lr-scale`
  times the learning rate (`Rule(lr_scale=...)`);
- `lora_embeddings`: a rank-`--lora-rank` update `A @ B` of the user and
  movie id embedding tables trains; everything else is frozen.

Metrics (the same NumPy code for both frameworks): top-10/50/100 retrieval
accuracy (is the rated movie among the K best scored of the whole catalogue,
per evaluation rating), and recall@K per user (the share of a user's
evaluation movies in their K best, after removing the movies they rated
before; averaged over users), with recall@100 split into users new since
pretraining and returning ones. Each run reports its trainable parameters
and seconds per epoch and per step (wall and CPU). `--seeds 0,1,2` repeats
pretraining and every strategy per seed and reports means and spreads.
At the end an index over the catalogue prints recommendations for a few
users next to their history.

Outputs under `--output-dir`: `results.json` (one strategy) or
`comparison.json` and `comparison.md` (`--compare`), written atomically.

`main(argv)` returns the results as a dict, so tests can import it. This
module imports no TensorFlow until `main` knows the framework; its other
names (`build_vocabulary`, `build_model`, `train`, `make_dataset`, ...) are
the shared ones of `_two_tower_common.py`, with `build_model` and `train`
dispatching to the framework.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import _common  # noqa: E402  (light: no TensorFlow, Keras or keras_peft)

DEFAULT_DATA = "tfds:movielens/100k-ratings"
DEFAULT_OUTPUT_DIR = os.path.join("runs", "two_tower_recommender")
FRAMEWORKS = ("keras-rs", "tfrs")
STRATEGIES = ("none", "full_retrain", "full_finetune", "query_tower", "user_embeddings",
              "new_id_embeddings", "tower_lr", "lora_embeddings")
_ARGUMENTS = {name: _common.NO_ARG for name in STRATEGIES}  # plain names, no `:arg`
_UNKNOWN = "unknown strategy {spec!r}; expected one of: {choices}"
_WORDING = _common.Wording(unknown=_UNKNOWN, needs_arg=_UNKNOWN, takes_no_arg=_UNKNOWN)
KERAS_RS_MISSING = (
    "--framework keras-rs: keras-rs is not installed. It needs Python >= 3.11 (this is "
    "Python {version}); install it with `pip install \"keras-rs==0.4.0\"`, or run the "
    "TFRS version with --framework tfrs."
)


def default_framework() -> str:
    """`keras-rs` when it can be imported, else `tfrs`."""
    return "keras-rs" if importlib.util.find_spec("keras_rs") is not None else "tfrs"


def framework_module(name: str):
    """The framework's module, imported the way it needs (`tfrs`: Keras 2 as `tf.keras`).

    For `tfrs`, `TF_USE_LEGACY_KERAS=1` is set first; it only takes effect when
    TensorFlow has not been imported yet, and the module's first use of TFRS
    says what to do otherwise. `keras-rs` leaves the environment alone.
    """
    if name == "tfrs":
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before TensorFlow is imported
        module = importlib.import_module("_two_tower_tfrs")
        module._tfrs()  # fail early, with what to do, if tf.keras is not Keras 2
        return module
    if name == "keras-rs":
        if importlib.util.find_spec("keras_rs") is None:
            raise RuntimeError(KERAS_RS_MISSING.format(version=sys.version.split()[0]))
        return importlib.import_module("_two_tower_keras_rs")
    raise ValueError(f"Unknown framework {name!r}. Expected one of: {', '.join(FRAMEWORKS)}.")


def _model_framework(model) -> str:
    import keras

    return "keras-rs" if isinstance(model, keras.Model) else "tfrs"


# Backward-compatible names: the shared helpers, and the framework-dispatching ones.
def build_model(vocab, args, seed: int):
    """The two-tower model of `args.framework`, built (so it can be wrapped at once)."""
    return framework_module(args.framework).build_model(vocab, args, seed)


def train(model, dataset, epochs, learning_rate, verbose):
    """Adagrad on the model's framework; returns the epochs' timings."""
    return framework_module(_model_framework(model)).train(model, dataset, epochs,
                                                            learning_rate, verbose)


def __getattr__(name):  # PEP 562: the shared names, imported on first use
    if name.startswith("__"):
        raise AttributeError(name)
    common = importlib.import_module("_two_tower_common")
    try:
        return getattr(common, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


# ------------------------------------------------------------------ the runs
def _train_strategy(name, args, fw, data, parts, vocab, pretrained, seed):
    """The model of strategy `name`, trained. Returns `(model, timer, epochs, updated, report)`:
    `timer` None when nothing trained, `updated` the parameters a row mask lets change."""
    import numpy as np
    from _two_tower_common import frozen_all, make_dataset, new_id_rows, strategy_rules

    import keras_peft

    model = fw.build_model(vocab, args, seed)
    timer, epochs, updated = None, 0, None
    if name == "full_retrain":
        rows = np.concatenate([parts.pretrain, parts.adapt])
        timer = fw.train(model, make_dataset(data, rows, args.batch_size, seed),
                         args.epochs, args.learning_rate, args.verbose)
        return model, timer, args.epochs, updated, keras_peft.report(model)
    model.set_weights(pretrained)
    if name == "none":
        return model, timer, epochs, updated, keras_peft.report(model, frozen_all())
    if name == "new_id_embeddings":
        masks = new_id_rows(vocab)
        model.set_row_masks(masks["user"], masks["movie"])
        updated = int(masks["user"].sum() + masks["movie"].sum()) * args.id_dim
    keras_peft.wrap(model, strategy_rules(name, model, args))
    report = keras_peft.report(model)
    if args.verbose >= 2:
        print(report)
    timer = fw.train(model, make_dataset(data, parts.adapt, args.batch_size, seed),
                     args.adapt_epochs, args.adapt_learning_rate, args.verbose)
    return model, timer, args.adapt_epochs, updated, report


def run_strategy(name, args, fw, data, parts, vocab, pretrained, ev, pretrain_timing,
                 seed) -> dict:
    from _two_tower_common import steady

    started = time.perf_counter()
    if args.verbose:
        print(f"\n=== {name} (seed {seed}) ===", flush=True)
    model, timer, epochs, updated, report = _train_strategy(name, args, fw, data, parts, vocab,
                                                            pretrained, seed)
    metrics = fw.evaluate(model, vocab, ev, args.verbose)
    per_epoch = steady(timer.seconds) if timer else 0.0
    steps = timer.steps / max(len(timer.seconds), 1) if timer else 0
    result = {
        "strategy": name,
        "seed": seed,
        "framework": args.framework,
        **metrics,
        "trainable_params": report.trainable_params,
        "updated_params": report.trainable_params if updated is None else updated,
        "total_params": report.total_params,
        "epochs": epochs,
        "seconds_per_epoch": per_epoch,
        "cpu_seconds_per_epoch": steady(timer.cpu_seconds) if timer else 0.0,
        "seconds_per_step": per_epoch / steps if steps else 0.0,
        "first_epoch_seconds": float(timer.seconds[0]) if timer else 0.0,
        "train_examples": int(len(parts.pretrain) + len(parts.adapt)) if name == "full_retrain"
        else (0 if name == "none" else len(parts.adapt)),
        "pretrain_seconds_per_epoch": pretrain_timing[0],
        "pretrain_cpu_seconds_per_epoch": pretrain_timing[1],
        "wall_seconds": time.perf_counter() - started,
    }
    if args.verbose:
        print(f"{name}: top-10/50/100 {result['top_10']:.4f}/{result['top_50']:.4f}/"
              f"{result['top_100']:.4f}, recall@10/100 {result['recall_10']:.4f}/"
              f"{result['recall_100']:.4f}, trainable {result['updated_params']:,} of "
              f"{result['total_params']:,}, {result['seconds_per_epoch']:.2f} s/epoch "
              f"({result['cpu_seconds_per_epoch']:.2f} CPU s)", flush=True)
    return {"result": result, "model": model}


def print_recommendations(recs: list[dict]) -> None:
    for r in recs:
        status = "new user" if r["new_user"] else "returning user"
        print(f"\nUser {r['user']} ({status}), last rated before evaluation:")
        for title in r["history"]:
            print(f"    {title}")
        print(f"  recommended ({r['index']} index; * = rated by the user later, "
              "in the evaluation period):")
        for rec in r["recommended"]:
            print(f"  {'*' if rec['rated_later'] else ' '} {rec['title']}")


# ---------------------------------------------------------------------- main
def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 0,1,2; received {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(
            f"expected distinct comma-separated integers such as 0,1,2; received {text!r}")
    return seeds


def _add_data_options(p) -> None:
    p.add_argument("--framework", choices=FRAMEWORKS, default=None,
                   help="keras-rs (Keras 3; the default when keras_rs imports) or tfrs "
                        "(tensorflow-recommenders on tf.keras 2)")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="tfds:NAME, a MovieLens folder (ml-latest-small: ratings.csv + "
                        "movies.csv; ml-100k: u.data + u.item), or 'synthetic'")
    p.add_argument("--tfds-data-dir", default=None, help="tensorflow-datasets data_dir")
    p.add_argument("--split", choices=("time", "random"), default="time")
    p.add_argument("--cutoff", default="0.8",
                   help="end of the pretraining period: a quantile of the timestamps or a "
                        "date YYYY-MM-DD (random split: the pretraining fraction)")
    p.add_argument("--adapt-fraction", type=float, default=0.5,
                   help="share of each user's later ratings used to adapt (the rest is evaluated)")


def _add_strategy_and_model_options(p) -> None:
    p.add_argument("--strategy", default="query_tower", help=f"one of: {', '.join(STRATEGIES)}")
    p.add_argument("--compare", default=None,
                   help="comma-separated strategies, or 'all'; 'none' is always included")
    p.add_argument("--embedding-dim", type=int, default=32)
    p.add_argument("--id-dim", type=int, default=32, help="user and movie id embedding width")
    p.add_argument("--text-dim", type=int, default=16, help="title word and genre embedding width")
    p.add_argument("--max-title-words", type=int, default=10_000)
    p.add_argument("--query-features", default="",
                   help="extra query features, comma-separated: 'timestamp' (bucketized)")


def _add_training_options(p) -> None:
    p.add_argument("--epochs", type=int, default=5, help="pretraining (and full_retrain) epochs")
    p.add_argument("--learning-rate", type=float, default=0.1, help="Adagrad, pretraining")
    p.add_argument("--adapt-epochs", type=int, default=5)
    p.add_argument("--adapt-learning-rate", type=float, default=0.1, help="Adagrad, adaptation")
    p.add_argument("--candidate-lr-scale", type=float, default=0.1,
                   help="tower_lr: lr_scale of the candidate tower")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--lora", default=None, metavar="SPEC",
                   help="lora_embeddings: the adapter, overriding --lora-rank (default "
                        f"lora:RANK). {_common.LORA_HELP}")
    p.add_argument("--logq", action=argparse.BooleanOptionalAction, default=True,
                   help="correct the in-batch softmax for popularity (subtract log frequency)")
    p.add_argument("--remove-accidental-hits", action=argparse.BooleanOptionalAction,
                   default=False, help="do not count a batch's copies of the positive as negatives")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=_seeds, default=None,
                   help="comma-separated seeds (e.g. 0,1,2): pretraining and every strategy "
                        "once per seed; tables give mean ± spread (max - min). Default: --seed")


def _add_output_options(p) -> None:
    p.add_argument("--examples", type=int, default=3, help="users to show recommendations for")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR)
    p.add_argument("--verbose", type=int, default=1,
                   help="0 silent, 1 progress bars and a summary, 2 also the per-layer report")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_data_options(p)
    _add_strategy_and_model_options(p)
    _add_training_options(p)
    _add_output_options(p)
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _check_args(p, args) -> None:
    """Fills in --framework and the strategy list; p.error for what is not allowed."""
    if args.framework is None:
        args.framework = default_framework()
        if args.framework == "tfrs" and args.verbose:
            print("keras-rs is not installed (it needs Python >= 3.11; pip install "
                  "\"keras-rs==0.4.0\"): running on tensorflow-recommenders (--framework tfrs).",
                  flush=True)
    args.query_features = [f for f in args.query_features.split(",") if f]
    unknown = set(args.query_features) - {"timestamp"}
    if unknown:
        p.error(f"--query-features: unknown {sorted(unknown)}; available: timestamp")
    if args.compare:
        names = list(STRATEGIES) if args.compare == "all" else args.compare.split(",")
        args.strategies = ["none"] + [n for n in dict.fromkeys(names) if n != "none"]
    else:
        args.strategies = ["none"] + ([args.strategy] if args.strategy != "none" else [])
    for name in args.strategies:
        try:
            _common.parse_strategy(name, _ARGUMENTS, wording=_WORDING, strip=False)
        except ValueError as e:
            p.error(str(e))
    if args.lora is not None:
        try:
            _common.parse_lora(*args.lora.partition(":")[::2])
        except ValueError as e:
            p.error(str(e))
    for name in ("epochs", "adapt_epochs", "batch_size", "lora_rank", "id_dim",
                 "embedding_dim", "text_dim"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1; received "
                    f"{getattr(args, name)}")
    if args.seeds is None:
        args.seeds = [args.seed]


def _data_facts(args, fw, data, parts, vocab, ev) -> dict:
    import numpy as np

    return {
        "source": data.source,
        "framework": args.framework,
        "versions": fw.versions(),
        "ratings": len(data),
        "users": len(np.unique(data.user)),
        "movies": len(data.movie_ids),
        "split": parts.description,
        **parts.sizes(),
        "vocabulary_users": len(vocab.users),
        "new_users": int(len(vocab.users) - len(vocab.pretrain_users & set(vocab.users))),
        "new_movies": int(len(vocab.movie_ids) - len(vocab.pretrain_movies)),
        "evaluation_users": len(ev.users),
        "evaluation_users_new": int(ev.new_user.sum()),
        "random_top_100": 100 / len(data.movie_ids),
    }


def _print_data(args, info, data, parts) -> None:
    print(f"Framework: {args.framework} ({info['versions']}).\n"
          f"Data: {data.source}: {len(data):,} ratings, {info['users']} users, "
          f"{info['movies']} movies.\n{parts.description}: {info['pretrain']:,} pretrain, "
          f"{info['adapt']:,} adapt, {info['evaluate']:,} evaluation ratings from "
          f"{info['evaluation_users']} users ({info['evaluation_users_new']} new since "
          f"pretraining). A random ranking has top-100 accuracy "
          f"{info['random_top_100']:.4f}.", flush=True)


def _runs_over_seeds(args, fw, data, parts, vocab, ev):
    """Per seed: pretraining on the earlier period, then every strategy from it.
    Returns the results and the last model trained."""
    from _two_tower_common import make_dataset, steady

    runs, last = [], None
    for seed in args.seeds:
        if args.verbose:
            print(f"\n=== pretraining (seed {seed}) ===", flush=True)
        model = fw.build_model(vocab, args, seed)
        timer = fw.train(model, make_dataset(data, parts.pretrain, args.batch_size, seed),
                         args.epochs, args.learning_rate, args.verbose)
        pretrained = model.get_weights()
        pretrain_per_epoch = (steady(timer.seconds), steady(timer.cpu_seconds))
        for name in args.strategies:
            out = run_strategy(name, args, fw, data, parts, vocab, pretrained, ev,
                               pretrain_per_epoch, seed)
            runs.append(out["result"])
            last = out["model"]
    return runs, last


def _write_outputs(args, result, info, parts, table) -> None:
    seeds = ", ".join(map(str, args.seeds))
    if args.compare:
        _common.write_json(os.path.join(args.output_dir, "comparison.json"), result)
        _common.write_text(os.path.join(args.output_dir, "comparison.md"),
                           f"{info['source']}, {parts.description}; framework "
                           f"{args.framework}; seeds {seeds}\n\n{table}\n")
    else:
        _common.write_json(os.path.join(args.output_dir, "results.json"), result)
    if args.verbose:
        print(f"\n{args.framework}, seeds {seeds}\n{table}\n\nResults in {args.output_dir}"
              f"{os.sep}{'comparison.json' if args.compare else 'results.json'}", flush=True)


def main(argv=None) -> dict:
    """Runs the recipe; returns `{"settings", "data", "runs", "summary", "recommendations"}`."""
    args = parse_args(argv)
    fw = framework_module(args.framework)  # fails early, with what to do
    from _movielens import MovieLensError, load_ratings, split, synthetic
    from _two_tower_common import build_vocabulary, comparison_table, make_eval_set, summarize

    try:
        data = synthetic() if args.data == "synthetic" else load_ratings(
            args.data, data_dir=args.tfds_data_dir)
        parts = split(data, args.split, args.cutoff, args.adapt_fraction, args.seed)
    except MovieLensError as e:
        raise SystemExit(f"error: {e}") from None
    vocab = build_vocabulary(data, parts, args.max_title_words)
    ev = make_eval_set(data, parts)
    info = _data_facts(args, fw, data, parts, vocab, ev)
    if args.verbose:
        _print_data(args, info, data, parts)

    runs, last = _runs_over_seeds(args, fw, data, parts, vocab, ev)
    shown = args.strategies[-1]
    recs = fw.recommend(last, vocab, data, parts, ev, users=args.examples)
    if args.verbose:
        print(f"\nExample recommendations from {shown} (seed {args.seeds[-1]}):")
        print_recommendations(recs)

    summary = summarize(runs)
    settings = {k: v for k, v in vars(args).items()}
    result = {"settings": settings, "data": info, "runs": runs, "summary": summary,
              "recommendations": {"strategy": shown, "users": recs}}
    table = comparison_table(summary)
    _write_outputs(args, result, info, parts, table)
    result["table"] = table
    return result


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:
        if "keras-rs is not installed" in str(e) or "needs `tf.keras` to be Keras 2" in str(e):
            raise SystemExit(f"error: {e}") from None
        raise
