"""What the two-tower recipe's frameworks share: vocabulary, data sets, strategies, metrics.

`recipes/two_tower_recommender.py` builds the same two-tower model on
tensorflow-recommenders (`_two_tower_tfrs.py`, tf.keras 2) or on keras-rs
(`_two_tower_keras_rs.py`, Keras 3). Everything that must not differ between
the two lives here, once: the vocabulary the lookups know, the features of a
rating, the strategies' rules, the ids that count as new, the evaluation
(top-K accuracy and recall@K, computed in NumPy from the towers' embeddings)
and the tables.

TensorFlow and Keras are imported inside the functions that need them, so
that importing this module does not decide what `tf.keras` is (see
docs/tf-keras.md).

This module is recipe code, not part of the keras_peft library.
"""

from __future__ import annotations

import dataclasses

import _common
import numpy as np
from _movielens import MovieLens, Split

KS = (10, 50, 100)
STRATEGIES = ("none", "full_retrain", "full_finetune", "query_tower", "user_embeddings",
              "new_id_embeddings", "tower_lr", "lora_embeddings")
MAX_GENRES = 10  # genres per movie kept (ml-latest-small has at most 10)


# ----------------------------------------------------------------- vocabulary
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
    pretrain_users: set = dataclasses.field(default_factory=set)
    pretrain_movies: set = dataclasses.field(default_factory=set)


def build_vocabulary(data: MovieLens, parts: Split, max_title_words: int) -> Vocabulary:
    """Users known when adaptation runs (pretraining and adaptation periods), the catalogue.

    Users who first rate after the cut-off are in the vocabulary from the
    start; pretraining leaves their embeddings at their random initial
    values, which is what adaptation has to fix. Users first seen in the
    evaluation data fall into the lookup's out-of-vocabulary row.

    The title words come from Keras 3's `TextVectorization` (the same
    standardisation as tf.keras'), so both frameworks get the same list.
    """
    import keras

    known = np.concatenate([parts.pretrain, parts.adapt])
    users = np.unique(data.user[known])
    genre_names = sorted({g for gs in data.genres for g in gs.split("|") if g})
    vectorizer = keras.layers.TextVectorization(max_tokens=max_title_words + 2)
    vectorizer.adapt(data.titles.tolist())
    words = [str(w) for w in vectorizer.get_vocabulary()[2:]]  # no mask and OOV tokens
    pre_times = data.timestamp[parts.pretrain]
    boundaries = sorted(set(np.quantile(pre_times, np.linspace(0, 1, 21)[1:-1]).tolist()))
    return Vocabulary(users, data.movie_ids, data.titles, data.genres, genre_names, words,
                      boundaries, set(data.user[parts.pretrain].tolist()),
                      set(data.item[parts.pretrain].tolist()))


def new_id_rows(vocab: Vocabulary) -> dict[str, np.ndarray]:
    """Boolean masks over the rows of the user and movie id tables: ids new since the cut-off.

    Row 0 of each table is the lookup's out-of-vocabulary row (`StringLookup`
    with `mask_token=None`); row i + 1 is `vocab.users[i]` (`vocab.movie_ids[i]`).
    A row is new when its id has no rating in the pretraining period; the
    out-of-vocabulary row never is.
    """
    users = np.r_[False, [u not in vocab.pretrain_users for u in vocab.users.tolist()]]
    movies = np.r_[False, [m not in vocab.pretrain_movies for m in vocab.movie_ids.tolist()]]
    return {"user": users.astype(bool), "movie": movies.astype(bool)}


# ---------------------------------------------------------------- data sets
def genre_lists(genres: np.ndarray) -> np.ndarray:
    """`"Action|Comedy"` strings -> a `(n, MAX_GENRES)` string array padded with `""`."""
    out = np.full((len(genres), MAX_GENRES), "", dtype=object)
    for i, text in enumerate(genres.tolist()):
        names = [g for g in text.split("|") if g][:MAX_GENRES]
        out[i, :len(names)] = names
    return out.astype(str)


def features(data: MovieLens, indices: np.ndarray) -> dict:
    """One entry per rating: what either framework's towers read.

    `genres` is the `|`-joined string (the TFRS tower splits it);
    `genre_list` the same genres padded to `MAX_GENRES` (the Keras 3 tower,
    which has no ragged tensors). `probability` is the movie's share of the
    ratings in `indices` (the logQ correction).
    """
    titles, genres = data.titles_by_id(), dict(zip(data.movie_ids.tolist(), data.genres.tolist()))
    items = data.item[indices]
    values, counts = np.unique(items, return_counts=True)
    share = dict(zip(values.tolist(), (counts / max(len(items), 1)).tolist()))
    genre_text = np.array([genres[i] for i in items]).astype(str)
    return {
        "probability": np.array([share[i] for i in items], np.float32),
        "user_id": data.user[indices],
        "movie_id": items,
        "title": np.array([titles[i] for i in items]).astype(str),
        "genres": genre_text,
        "genre_list": genre_lists(genre_text),
        "timestamp": data.timestamp[indices],
    }


def make_dataset(data, indices, batch_size, shuffle_seed=None):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(features(data, indices))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(indices), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def catalogue_features(vocab: Vocabulary) -> dict:
    return {"movie_id": vocab.movie_ids, "title": vocab.titles, "genres": vocab.genres,
            "genre_list": genre_lists(vocab.genres)}


def catalogue_dataset(vocab: Vocabulary):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(catalogue_features(vocab))


# ---------------------------------------------------------------- strategies
def strategy_rules(name: str, model, args) -> dict | None:
    """The rules each adaptation strategy wraps the pretrained model with.

    The towers' variable paths are the same on both frameworks
    (`query/user_embedding/embeddings`, `candidate/projection/kernel`, ...),
    so one table serves both. `new_id_embeddings` trains the same two id
    tables as `lora_embeddings` targets, in full; the model's row masks
    (`set_row_masks`) keep the rows of ids seen before the cut-off fixed.
    """
    import keras_peft
    from keras_peft import Rule

    frozen = Rule(trainable=False, note="frozen")
    if name == "full_finetune":
        return keras_peft.full(model)
    if name == "query_tower":
        return {"candidate/.*": Rule(trainable=False, note="candidate tower frozen"),
                "query/.*": Rule(note="query tower")}
    if name == "user_embeddings":
        return {"query/user_embedding/embeddings": Rule(note="user embeddings"), ".*": frozen}
    if name == "new_id_embeddings":
        return {"query/user_embedding/embeddings": Rule(note="new users' rows only"),
                "candidate/movie_embedding/embeddings": Rule(note="new movies' rows only"),
                ".*": frozen}
    if name == "tower_lr":
        return {"candidate/.*": Rule(lr_scale=args.candidate_lr_scale, note="candidate tower"),
                "query/.*": Rule(note="query tower")}
    if name == "lora_embeddings":
        spec = getattr(args, "lora", None) or f"lora:{args.lora_rank}"
        lora_name, _, arg = spec.partition(":")
        return _common.parse_lora(lora_name, arg).rules(
            model, r"query/user_embedding|candidate/movie_embedding")
    raise ValueError(f"Unknown strategy {name!r}. Expected one of {', '.join(STRATEGIES)}.")


def steady(values: list[float]) -> float:
    """The median epoch after the first (which also traces the train step)."""
    return float(np.median(values[1:] or values)) if values else 0.0


# ---------------------------------------------------------------- evaluation
@dataclasses.dataclass
class EvalSet:
    ratings: dict  # features of every evaluation rating
    users: np.ndarray  # evaluation users
    relevant: list  # per user: set of catalogue indices rated in evaluation
    seen: list  # per user: catalogue indices rated before (removed from their list)
    new_user: np.ndarray  # bool: no rating in the pretraining period
    query_time: np.ndarray  # the user's first evaluation timestamp
    target: np.ndarray  # per evaluation rating: the catalogue index of its movie


def make_eval_set(data: MovieLens, parts: Split) -> EvalSet:
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
        ratings=features(data, parts.evaluate),
        users=users,
        relevant=[relevant[u] for u in users],
        seen=[seen.get(u, set()) for u in users],
        new_user=np.array([u not in pre_users for u in users]),
        query_time=np.array([first[u] for u in users], np.int64),
        target=np.array([index[m] for m in data.item[parts.evaluate].tolist()], np.int64),
    )


def retrieval_metrics(rating_queries: np.ndarray, user_queries: np.ndarray,
                      candidates: np.ndarray, ev: EvalSet) -> dict:
    """Top-K accuracy per evaluation rating and recall@K per user, over the whole catalogue.

    - `top_K`: the rated movie is among the K best scored movies of the
      catalogue for that rating's query (ties counted against it); the
      user's earlier movies are **not** removed (as TFRS' `FactorizedTopK`).
    - `recall_K`: per user, the share of their evaluation movies among their
      K best once the movies they rated before are removed, averaged over
      users; recall@100 also for users new since pretraining and returning ones.
    """
    out = {}
    ranks = np.empty(len(ev.target), np.int64)
    for start in range(0, len(ev.target), 1024):
        scores = rating_queries[start:start + 1024] @ candidates.T
        own = scores[np.arange(len(scores)), ev.target[start:start + 1024]]
        ranks[start:start + 1024] = (scores >= own[:, None]).sum(axis=1) - 1
    for k in KS:
        out[f"top_{k}"] = float((ranks < k).mean())
    scores = user_queries @ candidates.T
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


def pick_users(ev: EvalSet, users: int) -> np.ndarray:
    """The evaluation users with the most evaluation ratings (for the examples)."""
    return np.argsort([-len(s) for s in ev.relevant], kind="stable")[:users]


def user_history(data: MovieLens, parts: Split, user: str) -> list[str]:
    known = np.concatenate([parts.pretrain, parts.adapt])
    mine = known[data.user[known] == user]
    mine = mine[np.argsort(data.timestamp[mine], kind="stable")]
    return [str(m) for m in data.item[mine]]


# --------------------------------------------------------------------- tables
METRICS = ("top_10", "top_50", "top_100", "recall_10", "recall_50", "recall_100",
           "recall_100_new_users")


def summarize(runs: list[dict]) -> list[dict]:
    """Per strategy: mean and spread (max - min) over the seeds of every metric and timing."""
    out = []
    for name in dict.fromkeys(r["strategy"] for r in runs):
        mine = [r for r in runs if r["strategy"] == name]
        row = {"strategy": name, "seeds": [r["seed"] for r in mine],
               "trainable_params": mine[0]["trainable_params"],
               "updated_params": mine[0].get("updated_params", mine[0]["trainable_params"]),
               "total_params": mine[0]["total_params"],
               "train_examples": mine[0]["train_examples"]}
        for key in METRICS + ("seconds_per_epoch", "cpu_seconds_per_epoch",
                              "seconds_per_step", "seconds_per_step_ms"):
            values = [r[key] for r in mine if r.get(key) is not None]
            if key == "seconds_per_step_ms":
                values = [1000 * r["seconds_per_step"] for r in mine]
            row[key] = float(np.mean(values)) if values else None
            row[f"{key}_spread"] = float(np.ptp(values)) if values else None
        out.append(row)
    return out


def comparison_table(rows: list[dict]) -> str:
    """Markdown; with several seeds each cell is `mean ± spread` (max - min).

    "params that train" counts the numbers that can change: for
    `new_id_embeddings` the new ids' rows, not the whole tables.
    """
    def cell(r, key, digits=4):
        value, spread = r.get(key), r.get(f"{key}_spread")
        if value is None:
            return "-"
        if spread is None or len(r.get("seeds", [0])) < 2:
            return f"{value:.{digits}f}"
        return f"{value:.{digits}f} ± {spread:.{digits}f}"

    lines = [
        "| strategy | top-10 | top-100 | recall@10 | recall@50 | recall@100 | recall@100 new "
        "users | params that train | examples/epoch | s/epoch | CPU s/epoch | ms/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        step = r.get("seconds_per_step")
        trained = bool(r["train_examples"])
        lines.append(
            f"| {r['strategy']} | {cell(r, 'top_10')} | {cell(r, 'top_100')} | "
            f"{cell(r, 'recall_10')} | {cell(r, 'recall_50')} | {cell(r, 'recall_100')} | "
            f"{cell(r, 'recall_100_new_users')} | {r['updated_params']:,} | "
            f"{r['train_examples']:,} | {cell(r, 'seconds_per_epoch', 2) if trained else '-'} | "
            f"{cell(r, 'cpu_seconds_per_epoch', 2) if trained else '-'} | "
            f"{cell(r, 'seconds_per_step_ms', 1) if trained and step else '-'} |"
        )
    return "\n".join(lines)



def frozen_all() -> dict:
    """`{".*": Rule(trainable=False)}`: how `none` is reported."""
    from keras_peft import Rule

    return {".*": Rule(trainable=False, note="frozen")}
