"""Two-tower movie recommender (TFRS), pretrained on the past, adapted to the present.

    python recipes/two_tower_recommender.py --data ../shared/data/movielens-latest-small
    python recipes/two_tower_recommender.py --data ../shared/data/movielens-latest-small \\
        --compare all
    python recipes/two_tower_recommender.py            # tfds:movielens/100k-ratings (online)

A tensorflow-recommenders retrieval model: the **query tower** embeds the user
id (plus, with `--query-features timestamp`, the time of the request); the
**candidate tower** embeds the movie id, its title (words, averaged) and its
genres, and projects both to one space. It is trained with `tfrs.tasks.Retrieval`
(in-batch softmax) and evaluated with `FactorizedTopK` against every movie of
the catalogue.

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
- `tower_lr`: everything trains, the candidate tower at `--candidate-lr-scale`
  times the learning rate (`Rule(lr_scale=...)`);
- `lora_embeddings`: a rank-`--lora-rank` update `A @ B` of the user and
  movie id embedding tables trains; everything else is frozen.

Metrics: top-10/50/100 retrieval accuracy (`FactorizedTopK`: is the rated
movie among the K best scored of the whole catalogue, per evaluation
rating), and recall@K per user (the share of a user's evaluation movies in
their K best, after removing the movies they rated before; averaged over
users), with recall@100 split into users new since pretraining and returning
ones. Each run reports its trainable parameters and seconds per epoch (wall
and CPU).
At the end a brute-force index (ScaNN if installed) over the catalogue
prints recommendations for a few users next to their history.

Outputs under `--output-dir`: `results.json` (one strategy) or
`comparison.json` and `comparison.md` (`--compare`), written atomically.

`main(argv)` returns the results as a dict, so tests can import it.
tensorflow-recommenders needs Keras 2 as `tf.keras`: this script sets
`TF_USE_LEGACY_KERAS=1` before importing TensorFlow.
"""

from __future__ import annotations

import os

# Before TensorFlow is imported (see docs/tf-keras.md).
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import dataclasses
import importlib.util
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _movielens import MovieLens, MovieLensError, Split, load_ratings, split, synthetic  # noqa: E402

import keras_peft  # noqa: E402
from keras_peft import Rule  # noqa: E402
from keras_peft.io import atomic_write_json, atomic_write_text  # noqa: E402
from keras_peft.tf_keras import require_legacy_keras  # noqa: E402

DEFAULT_DATA = "tfds:movielens/100k-ratings"
DEFAULT_OUTPUT_DIR = os.path.join("runs", "two_tower_recommender")
KS = (10, 50, 100)
STRATEGIES = ("none", "full_retrain", "full_finetune", "query_tower", "user_embeddings",
              "tower_lr", "lora_embeddings")
FROZEN = Rule(trainable=False, note="frozen")


# ---------------------------------------------------------------------- model
def _tfrs():
    require_legacy_keras("recipes/two_tower_recommender.py (tensorflow-recommenders)")
    import tensorflow_recommenders as tfrs

    return tfrs


@dataclasses.dataclass
class Vocabulary:
    """What the towers' lookup layers know: built once, shared by every model."""

    users: np.ndarray
    movie_ids: np.ndarray
    titles: np.ndarray
    genres: np.ndarray
    genre_names: list
    title_words: list
    time_boundaries: list


def build_vocabulary(data: MovieLens, parts: Split, max_title_words: int) -> Vocabulary:
    """Users known when adaptation runs (pretraining and adaptation periods), the catalogue.

    Users who first rate after the cut-off are in the vocabulary from the
    start; pretraining leaves their embeddings at their random initial
    values, which is what adaptation has to fix. Users first seen in the
    evaluation data fall into the lookup's out-of-vocabulary row.
    """
    known = np.concatenate([parts.pretrain, parts.adapt])
    users = np.unique(data.user[known])
    genre_names = sorted({g for gs in data.genres for g in gs.split("|") if g})
    vectorizer = tf.keras.layers.TextVectorization(max_tokens=max_title_words + 2)
    vectorizer.adapt(tf.data.Dataset.from_tensor_slices(data.titles).batch(4096))
    words = vectorizer.get_vocabulary()[2:]  # without the mask and OOV tokens
    pre_times = data.timestamp[parts.pretrain]
    boundaries = sorted(set(np.quantile(pre_times, np.linspace(0, 1, 21)[1:-1]).tolist()))
    return Vocabulary(users, data.movie_ids, data.titles, data.genres, genre_names, words,
                      boundaries)


class QueryTower(tf.keras.Model):
    """User id (and optionally the request time) -> query embedding."""

    def __init__(self, vocab: Vocabulary, dim: int, id_dim: int, use_time: bool):
        super().__init__(name="query")
        self.use_time = use_time
        self.user_lookup = tf.keras.layers.StringLookup(
            vocabulary=vocab.users, mask_token=None, name="user_lookup")
        self.user_embedding = tf.keras.layers.Embedding(
            len(vocab.users) + 1, id_dim, name="user_embedding")
        if use_time:
            self.time_buckets = tf.keras.layers.Discretization(
                bin_boundaries=vocab.time_boundaries, name="time_buckets")
            self.time_embedding = tf.keras.layers.Embedding(
                len(vocab.time_boundaries) + 1, 8, name="time_embedding")
        self.projection = tf.keras.layers.Dense(dim, name="projection")

    def call(self, features):
        x = self.user_embedding(self.user_lookup(features["user_id"]))
        if self.use_time:
            t = self.time_embedding(self.time_buckets(tf.cast(features["timestamp"], tf.float64)))
            x = tf.concat([x, t], axis=-1)
        return self.projection(x)


class CandidateTower(tf.keras.Model):
    """Movie id, title words and genres -> candidate embedding."""

    def __init__(self, vocab: Vocabulary, dim: int, id_dim: int, text_dim: int):
        super().__init__(name="candidate")
        self.movie_lookup = tf.keras.layers.StringLookup(
            vocabulary=vocab.movie_ids, mask_token=None, name="movie_lookup")
        self.movie_embedding = tf.keras.layers.Embedding(
            len(vocab.movie_ids) + 1, id_dim, name="movie_embedding")
        self.title_vectorizer = tf.keras.layers.TextVectorization(
            vocabulary=vocab.title_words, name="title_vectorizer")
        self.title_embedding = tf.keras.layers.Embedding(
            len(vocab.title_words) + 2, text_dim, mask_zero=True, name="title_embedding")
        self.title_pooling = tf.keras.layers.GlobalAveragePooling1D(name="title_pooling")
        self.genre_lookup = tf.keras.layers.StringLookup(
            vocabulary=vocab.genre_names, mask_token=None, name="genre_lookup")
        self.genre_embedding = tf.keras.layers.Embedding(
            len(vocab.genre_names) + 1, text_dim, name="genre_embedding")
        self.projection = tf.keras.layers.Dense(dim, name="projection")

    def call(self, features):
        movie = self.movie_embedding(self.movie_lookup(features["movie_id"]))
        title = self.title_pooling(self.title_embedding(self.title_vectorizer(features["title"])))
        genres = tf.strings.split(features["genres"], "|")
        genres = tf.ragged.boolean_mask(genres, tf.strings.length(genres) > 0)
        genre_vectors = self.genre_embedding(self.genre_lookup(genres))
        count = tf.cast(genre_vectors.row_lengths(), tf.float32)[:, None]
        genre = tf.reduce_sum(genre_vectors, axis=1) / tf.maximum(count, 1.0)
        return self.projection(tf.concat([movie, title, genre], axis=-1))


def catalogue_dataset(vocab: Vocabulary) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(
        {"movie_id": vocab.movie_ids, "title": vocab.titles, "genres": vocab.genres})


def build_model(vocab: Vocabulary, args, seed: int):
    """A `tfrs.Model` with both towers built (so it can be wrapped at once)."""
    tfrs = _tfrs()
    tf.keras.utils.set_random_seed(seed)

    class TwoTowerModel(tfrs.Model):
        def __init__(self):
            super().__init__(name="two_tower")
            self.query_model = QueryTower(vocab, args.embedding_dim, args.id_dim,
                                          "timestamp" in args.query_features)
            self.candidate_model = CandidateTower(vocab, args.embedding_dim, args.id_dim,
                                                  args.text_dim)
            # Candidates with their ids: the metric checks whether the rated movie's id
            # is among the K retrieved (exact, where score ties could inflate it).
            candidates = catalogue_dataset(vocab).batch(1024).map(
                lambda f: (f["movie_id"], self.candidate_model(f)))
            self.task = tfrs.tasks.Retrieval(
                metrics=tfrs.metrics.FactorizedTopK(candidates=candidates, ks=KS),
                remove_accidental_hits=args.remove_accidental_hits)

        def compute_loss(self, features, training=False):
            extra = {"candidate_ids": features["movie_id"]}
            if args.logq:
                # In-batch negatives are drawn in proportion to popularity; subtracting
                # log(probability) from the logits removes that bias (Yi et al., 2019).
                extra["candidate_sampling_probability"] = features["probability"]
            return self.task(self.query_model(features), self.candidate_model(features),
                             compute_metrics=not training, **extra)

    model = TwoTowerModel()
    sample = {"user_id": vocab.users[:2], "timestamp": np.zeros(2, np.int64),
              "movie_id": vocab.movie_ids[:2], "title": vocab.titles[:2],
              "genres": vocab.genres[:2]}
    model.query_model(sample)
    model.candidate_model(sample)
    return model


# ------------------------------------------------------------------ strategies
def strategy_rules(name: str, model, args) -> dict | None:
    """The rules each adaptation strategy wraps the pretrained model with."""
    if name == "full_finetune":
        return keras_peft.full(model)
    if name == "query_tower":
        return {"candidate/.*": Rule(trainable=False, note="candidate tower frozen"),
                "query/.*": Rule(note="query tower")}
    if name == "user_embeddings":
        return {"query/user_embedding/embeddings": Rule(note="user embeddings"), ".*": FROZEN}
    if name == "tower_lr":
        return {"candidate/.*": Rule(lr_scale=args.candidate_lr_scale, note="candidate tower"),
                "query/.*": Rule(note="query tower")}
    if name == "lora_embeddings":
        return keras_peft.lora(model, rank=args.lora_rank,
                               targets=r"query/user_embedding|candidate/movie_embedding",
                               rest=FROZEN)
    raise ValueError(f"Unknown strategy {name!r}. Expected one of {', '.join(STRATEGIES)}.")


# ------------------------------------------------------------------ data sets
def features(data: MovieLens, indices: np.ndarray) -> dict:
    titles, genres = data.titles_by_id(), dict(zip(data.movie_ids.tolist(), data.genres.tolist()))
    items = data.item[indices]
    values, counts = np.unique(items, return_counts=True)
    share = dict(zip(values.tolist(), (counts / max(len(items), 1)).tolist()))
    return {
        "probability": np.array([share[i] for i in items], np.float32),
        "user_id": data.user[indices],
        "movie_id": items,
        "title": np.array([titles[i] for i in items]),
        "genres": np.array([genres[i] for i in items]),
        "timestamp": data.timestamp[indices],
    }


def make_dataset(data, indices, batch_size, shuffle_seed=None):
    ds = tf.data.Dataset.from_tensor_slices(features(data, indices))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(indices), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


class EpochTimer(tf.keras.callbacks.Callback):
    """Wall seconds and CPU seconds (this process, all threads) of every epoch.

    On a machine shared with other jobs the wall time of an epoch varies
    with their load; the CPU time the epoch used varies much less.
    """

    def on_train_begin(self, logs=None):
        self.seconds, self.cpu_seconds = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = (time.perf_counter(), time.process_time())

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start[0])
        self.cpu_seconds.append(time.process_time() - self._start[1])


def train(model, dataset, epochs, learning_rate, verbose) -> EpochTimer:
    """Adagrad, as in the TFRS tutorials; returns the epochs' timings."""
    model.compile(optimizer=tf.keras.optimizers.Adagrad(learning_rate))
    timer = EpochTimer()
    model.fit(dataset, epochs=epochs, verbose=verbose, callbacks=[timer])
    return timer


def steady(values: list[float]) -> float:
    """The median epoch after the first (which also traces the train step)."""
    return float(np.median(values[1:] or values)) if values else 0.0


# ------------------------------------------------------------------ evaluation
@dataclasses.dataclass
class EvalSet:
    dataset: tf.data.Dataset
    users: np.ndarray  # evaluation users
    relevant: list  # per user: set of catalogue indices rated in evaluation
    seen: list  # per user: catalogue indices rated before (removed from their list)
    new_user: np.ndarray  # bool: no rating in the pretraining period
    query_time: np.ndarray  # the user's first evaluation timestamp


def make_eval_set(data: MovieLens, parts: Split, batch_size: int) -> EvalSet:
    index = {m: i for i, m in enumerate(data.movie_ids.tolist())}
    known = np.concatenate([parts.pretrain, parts.adapt])
    pre_users = set(data.user[parts.pretrain].tolist())
    seen: dict[str, set] = {}
    for u, m in zip(data.user[known].tolist(), data.item[known].tolist()):
        seen.setdefault(u, set()).add(index[m])
    relevant: dict[str, set] = {}
    first: dict[str, int] = {}
    for u, m, t in zip(data.user[parts.evaluate].tolist(), data.item[parts.evaluate].tolist(),
                       data.timestamp[parts.evaluate].tolist()):
        relevant.setdefault(u, set()).add(index[m])
        first[u] = min(first.get(u, t), t)
    users = np.array(sorted(relevant))
    return EvalSet(
        dataset=make_dataset(data, parts.evaluate, batch_size),
        users=users,
        relevant=[relevant[u] for u in users],
        seen=[seen.get(u, set()) for u in users],
        new_user=np.array([u not in pre_users for u in users]),
        query_time=np.array([first[u] for u in users], np.int64),
    )


def candidate_embeddings(model, vocab: Vocabulary) -> np.ndarray:
    return np.concatenate([
        model.candidate_model(batch).numpy()
        for batch in catalogue_dataset(vocab).batch(2048)
    ])


def evaluate(model, vocab: Vocabulary, ev: EvalSet, verbose: int) -> dict:
    """Top-K accuracy (FactorizedTopK) and per-user recall@K, seen movies removed."""
    if model.optimizer is None:  # `none`: evaluated as pretrained, never compiled
        model.compile(optimizer=tf.keras.optimizers.Adagrad(0.1))
    logs = model.evaluate(ev.dataset, return_dict=True, verbose=verbose)
    out = {f"top_{k}": float(logs[f"factorized_top_k/top_{k}_categorical_accuracy"]) for k in KS}
    out["eval_loss"] = float(logs["loss"])
    queries = model.query_model({"user_id": ev.users, "timestamp": ev.query_time}).numpy()
    scores = queries @ candidate_embeddings(model, vocab).T
    for row, seen in enumerate(ev.seen):
        scores[row, list(seen)] = -np.inf
    best = np.argsort(-scores, axis=1, kind="stable")[:, :max(KS)]
    for k in KS:
        hits = np.array([len(rel.intersection(best[i, :k].tolist())) / len(rel)
                         for i, rel in enumerate(ev.relevant)])
        out[f"recall_{k}"] = float(hits.mean())
        if k == max(KS):
            for name, mask in (("new_users", ev.new_user), ("returning_users", ~ev.new_user)):
                out[f"recall_{k}_{name}"] = float(hits[mask].mean()) if mask.any() else None
    return out


# ------------------------------------------------------------------ the runs
def run_strategy(name, args, data, parts, vocab, pretrained, ev, pretrain_timing) -> dict:
    started = time.perf_counter()
    if args.verbose:
        print(f"\n=== {name} ===", flush=True)
    model = build_model(vocab, args, args.seed)
    timer = None
    epochs = 0
    if name == "full_retrain":
        rows = np.concatenate([parts.pretrain, parts.adapt])
        timer = train(model, make_dataset(data, rows, args.batch_size, args.seed),
                      args.epochs, args.learning_rate, args.verbose)
        epochs = args.epochs
        report = keras_peft.report(model)
    else:
        model.set_weights(pretrained)
        if name == "none":
            report = keras_peft.report(model, {".*": FROZEN})
        else:
            keras_peft.wrap(model, strategy_rules(name, model, args))
            report = keras_peft.report(model)
            if args.verbose >= 2:
                print(report)
            timer = train(model, make_dataset(data, parts.adapt, args.batch_size, args.seed),
                          args.adapt_epochs, args.adapt_learning_rate, args.verbose)
            epochs = args.adapt_epochs
    metrics = evaluate(model, vocab, ev, args.verbose)
    result = {
        "strategy": name,
        **metrics,
        "trainable_params": report.trainable_params,
        "total_params": report.total_params,
        "epochs": epochs,
        "seconds_per_epoch": steady(timer.seconds) if timer else 0.0,
        "cpu_seconds_per_epoch": steady(timer.cpu_seconds) if timer else 0.0,
        "first_epoch_seconds": float(timer.seconds[0]) if timer else 0.0,
        "train_examples": int(len(parts.pretrain) + len(parts.adapt)) if name == "full_retrain"
        else (0 if name == "none" else len(parts.adapt)),
        "pretrain_seconds_per_epoch": pretrain_timing[0],
        "pretrain_cpu_seconds_per_epoch": pretrain_timing[1],
        "wall_seconds": time.perf_counter() - started,
    }
    if args.verbose:
        print(f"{name}: top-10/50/100 {result['top_10']:.4f}/{result['top_50']:.4f}/"
              f"{result['top_100']:.4f}, recall@100 {result['recall_100']:.4f}, "
              f"trainable {result['trainable_params']:,} of {result['total_params']:,}, "
              f"{result['seconds_per_epoch']:.2f} s/epoch "
              f"({result['cpu_seconds_per_epoch']:.2f} CPU s)", flush=True)
    return {"result": result, "model": model}


def recommend(model, vocab: Vocabulary, data: MovieLens, parts: Split, ev: EvalSet,
              users: int = 3, k: int = 5) -> list[dict]:
    """Top-`k` movies for a few evaluation users from an index over the catalogue."""
    tfrs = _tfrs()
    titles = data.titles_by_id()
    factorized = tfrs.layers.factorized_top_k
    if importlib.util.find_spec("scann") is not None and hasattr(factorized, "ScaNN"):
        index, kind = factorized.ScaNN(model.query_model, k=k), "ScaNN"
    else:
        index, kind = factorized.BruteForce(model.query_model, k=k), "brute force"
    index.index_from_dataset(catalogue_dataset(vocab).batch(1024).map(
        lambda f: (f["movie_id"], model.candidate_model(f))))
    known = np.concatenate([parts.pretrain, parts.adapt])
    order = np.argsort([-len(s) for s in ev.relevant], kind="stable")[:users]
    out = []
    for i in order:
        user = str(ev.users[i])
        mine = known[data.user[known] == user]
        mine = mine[np.argsort(data.timestamp[mine], kind="stable")]
        history = [str(m) for m in data.item[mine]]
        exclusions = tf.constant([history or [""]])
        _, ids = index.query_with_exclusions(
            {"user_id": tf.constant([user]), "timestamp": tf.constant([ev.query_time[i]])},
            exclusions, k=k)
        picks = [x.decode() for x in ids.numpy()[0]]
        relevant = {str(vocab.movie_ids[j]) for j in ev.relevant[i]}
        out.append({
            "user": user,
            "new_user": bool(ev.new_user[i]),
            "history": [titles[m] for m in history[-5:]],
            "recommended": [{"title": titles.get(m, m), "rated_later": m in relevant}
                            for m in picks],
            "index": kind,
        })
    return out


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


def comparison_table(results: list[dict]) -> str:
    lines = [
        "| strategy | top-10 | top-50 | top-100 | recall@10 | recall@100 | recall@100 new "
        "users | trainable params | examples/epoch | s/epoch | CPU s/epoch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        new = r.get("recall_100_new_users")
        lines.append(
            f"| {r['strategy']} | {r['top_10']:.4f} | {r['top_50']:.4f} | {r['top_100']:.4f} | "
            f"{r['recall_10']:.4f} | {r['recall_100']:.4f} | "
            f"{'-' if new is None else f'{new:.4f}'} | {r['trainable_params']:,} | "
            f"{r['train_examples']:,} | {r['seconds_per_epoch']:.2f} | "
            f"{r['cpu_seconds_per_epoch']:.2f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--strategy", default="query_tower", help=f"one of: {', '.join(STRATEGIES)}")
    p.add_argument("--compare", default=None,
                   help="comma-separated strategies, or 'all'; 'none' is always included")
    p.add_argument("--embedding-dim", type=int, default=32)
    p.add_argument("--id-dim", type=int, default=32, help="user and movie id embedding width")
    p.add_argument("--text-dim", type=int, default=16, help="title word and genre embedding width")
    p.add_argument("--max-title-words", type=int, default=10_000)
    p.add_argument("--query-features", default="",
                   help="extra query features, comma-separated: 'timestamp' (bucketized)")
    p.add_argument("--epochs", type=int, default=5, help="pretraining (and full_retrain) epochs")
    p.add_argument("--learning-rate", type=float, default=0.1, help="Adagrad, pretraining")
    p.add_argument("--adapt-epochs", type=int, default=5)
    p.add_argument("--adapt-learning-rate", type=float, default=0.1, help="Adagrad, adaptation")
    p.add_argument("--candidate-lr-scale", type=float, default=0.1,
                   help="tower_lr: lr_scale of the candidate tower")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--logq", action=argparse.BooleanOptionalAction, default=True,
                   help="correct the in-batch softmax for popularity (subtract log frequency)")
    p.add_argument("--remove-accidental-hits", action=argparse.BooleanOptionalAction,
                   default=False, help="do not count a batch's copies of the positive as negatives")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--examples", type=int, default=3, help="users to show recommendations for")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR)
    p.add_argument("--verbose", type=int, default=1,
                   help="0 silent, 1 progress bars and a summary, 2 also the per-layer report")
    args = p.parse_args(argv)
    args.query_features = [f for f in args.query_features.split(",") if f]
    unknown = set(args.query_features) - {"timestamp"}
    if unknown:
        p.error(f"--query-features: unknown {sorted(unknown)}; available: timestamp")
    if args.compare:
        names = list(STRATEGIES) if args.compare == "all" else args.compare.split(",")
        args.strategies = ["none"] + [n for n in dict.fromkeys(names) if n != "none"]
    else:
        args.strategies = ["none"] + ([args.strategy] if args.strategy != "none" else [])
    bad = [n for n in args.strategies if n not in STRATEGIES]
    if bad:
        p.error(f"unknown strategy {bad[0]!r}; expected one of: {', '.join(STRATEGIES)}")
    return args


def main(argv=None) -> dict:
    """Runs the recipe; returns `{"settings", "data", "runs", "recommendations"}`."""
    args = parse_args(argv)
    _tfrs()  # fail early, with what to do, if tf.keras is not Keras 2
    try:
        data = synthetic() if args.data == "synthetic" else load_ratings(
            args.data, data_dir=args.tfds_data_dir)
        parts = split(data, args.split, args.cutoff, args.adapt_fraction, args.seed)
    except MovieLensError as e:
        raise SystemExit(f"error: {e}") from None
    vocab = build_vocabulary(data, parts, args.max_title_words)
    ev = make_eval_set(data, parts, 4096)
    info = {
        "source": data.source,
        "ratings": len(data),
        "users": len(np.unique(data.user)),
        "movies": len(data.movie_ids),
        "split": parts.description,
        **parts.sizes(),
        "vocabulary_users": len(vocab.users),
        "evaluation_users": len(ev.users),
        "evaluation_users_new": int(ev.new_user.sum()),
        "random_top_100": 100 / len(data.movie_ids),
    }
    if args.verbose:
        print(f"Data: {data.source}: {len(data):,} ratings, {info['users']} users, "
              f"{info['movies']} movies.\n{parts.description}: {info['pretrain']:,} pretrain, "
              f"{info['adapt']:,} adapt, {info['evaluate']:,} evaluation ratings from "
              f"{info['evaluation_users']} users ({info['evaluation_users_new']} new since "
              f"pretraining). A random ranking has top-100 accuracy "
              f"{info['random_top_100']:.4f}.", flush=True)

    # Pretraining on the earlier period, once; every strategy starts from it.
    if args.verbose:
        print("\n=== pretraining ===", flush=True)
    model = build_model(vocab, args, args.seed)
    timer = train(model, make_dataset(data, parts.pretrain, args.batch_size, args.seed),
                  args.epochs, args.learning_rate, args.verbose)
    pretrained = model.get_weights()
    pretrain_per_epoch = (steady(timer.seconds), steady(timer.cpu_seconds))

    runs, models = [], {}
    for name in args.strategies:
        out = run_strategy(name, args, data, parts, vocab, pretrained, ev, pretrain_per_epoch)
        runs.append(out["result"])
        models[name] = out["model"]

    shown = args.strategies[-1]
    recs = recommend(models[shown], vocab, data, parts, ev, users=args.examples)
    if args.verbose:
        print(f"\nExample recommendations from {shown}:")
        print_recommendations(recs)

    settings = {k: v for k, v in vars(args).items()}
    result = {"settings": settings, "data": info, "runs": runs,
              "recommendations": {"strategy": shown, "users": recs}}
    os.makedirs(args.output_dir, exist_ok=True)
    table = comparison_table(runs)
    if args.compare:
        atomic_write_json(os.path.join(args.output_dir, "comparison.json"), result)
        atomic_write_text(os.path.join(args.output_dir, "comparison.md"),
                          f"{info['source']}, {parts.description}\n\n{table}\n")
    else:
        atomic_write_json(os.path.join(args.output_dir, "results.json"), result)
    if args.verbose:
        print(f"\n{table}\n\nResults in {args.output_dir}{os.sep}"
              f"{'comparison.json' if args.compare else 'results.json'}", flush=True)
    result["table"] = table
    return result


if __name__ == "__main__":
    main()
