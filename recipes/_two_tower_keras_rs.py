"""The two-tower model on keras-rs (Keras 3): `--framework keras-rs`.

The same towers as `_two_tower_tfrs.py`, layer for layer and with the same
names (so the strategies' rules and variable paths are the same), as Keras 3
models: no `TF_USE_LEGACY_KERAS`, and `keras_peft.wrap` works on them
directly. The retrieval task TFRS provides is written out in
`TwoTowerModel.compute_loss`, as keras-rs' examples do: in-batch softmax
over `query @ candidates.T`, with keras-rs' `SamplingProbabilityCorrection`
(logQ), summed over the batch as `tfrs.tasks.Retrieval` does (so the same
learning rate means the same step). Recommendations come from
`keras_rs.layers.BruteForceRetrieval`.

Accidental hits (`--remove-accidental-hits`) are removed here, as TFRS does
(a logit plus float32's lowest / 100), not with keras-rs 0.4.0's
`RemoveAccidentalHits`: that layer adds float32's *smallest normal* / 100
(about 1e-40) to the duplicates' logits, which leaves float32 logits
unchanged, so it removes nothing (checked: logits [1, 2, 3] with the first
two candidates sharing an id come back [1, 2, 3]).

The lookups (`StringLookup`, `TextVectorization`) take strings, so this runs
on Keras' TensorFlow backend (the data pipeline is tf.data).

This module is recipe code, not part of the keras_peft library.
"""

from __future__ import annotations

import _common
import keras
import numpy as np
from _two_tower_common import (
    EvalSet,
    Vocabulary,
    catalogue_features,
    pick_users,
    retrieval_metrics,
    user_history,
)
from keras import ops

NAME = "keras-rs"
MIN_FLOAT = float(np.finfo(np.float32).min) / 100.0  # TFRS' value for removed logits
INSTALL = ('keras-rs is not installed. It needs Python >= 3.11: pip install "keras-rs==0.4.0" '
           "(or run with --framework tfrs).")


def _keras_rs():
    try:
        import keras_rs
    except ImportError as e:
        raise RuntimeError(f"{INSTALL} ({type(e).__name__}: {e})") from None
    return keras_rs


def versions() -> dict:
    import tensorflow as tf

    return {"keras-rs": _keras_rs().__version__, "keras": keras.__version__,
            "tensorflow": tf.__version__, "backend": keras.backend.backend()}


def _row_masked(embeddings, ids, rows):
    """`embeddings` where `rows[ids]`, else the same values with no gradient."""
    if rows is None:
        return embeddings
    keep = ops.expand_dims(ops.take(ops.convert_to_tensor(rows), ids), -1)
    return ops.where(keep, embeddings, ops.stop_gradient(embeddings))


class QueryTower(keras.Model):
    """User id (and optionally the request time) -> query embedding."""

    def __init__(self, vocab: Vocabulary, dim: int, id_dim: int, use_time: bool):
        super().__init__(name="query")
        self.use_time = use_time
        self.rows = None
        self.user_lookup = keras.layers.StringLookup(
            vocabulary=list(vocab.users), mask_token=None, name="user_lookup")
        self.user_embedding = keras.layers.Embedding(
            len(vocab.users) + 1, id_dim, name="user_embedding")
        if use_time:
            self.time_buckets = keras.layers.Discretization(
                bin_boundaries=vocab.time_boundaries, name="time_buckets")
            self.time_embedding = keras.layers.Embedding(
                len(vocab.time_boundaries) + 1, 8, name="time_embedding")
        self.projection = keras.layers.Dense(dim, name="projection")

    def call(self, features):
        ids = self.user_lookup(features["user_id"])
        x = _row_masked(self.user_embedding(ids), ids, self.rows)
        if self.use_time:
            times = ops.cast(features["timestamp"], "float64")
            x = ops.concatenate([x, self.time_embedding(self.time_buckets(times))], axis=-1)
        return self.projection(x)


class CandidateTower(keras.Model):
    """Movie id, title words and genres -> candidate embedding."""

    def __init__(self, vocab: Vocabulary, dim: int, id_dim: int, text_dim: int):
        super().__init__(name="candidate")
        self.rows = None
        self.movie_lookup = keras.layers.StringLookup(
            vocabulary=list(vocab.movie_ids), mask_token=None, name="movie_lookup")
        self.movie_embedding = keras.layers.Embedding(
            len(vocab.movie_ids) + 1, id_dim, name="movie_embedding")
        self.title_vectorizer = keras.layers.TextVectorization(
            vocabulary=list(vocab.title_words), name="title_vectorizer")
        self.title_embedding = keras.layers.Embedding(
            len(vocab.title_words) + 2, text_dim, mask_zero=True, name="title_embedding")
        self.title_pooling = keras.layers.GlobalAveragePooling1D(name="title_pooling")
        self.genre_lookup = keras.layers.StringLookup(
            vocabulary=list(vocab.genre_names), mask_token=None, name="genre_lookup")
        self.genre_embedding = keras.layers.Embedding(
            len(vocab.genre_names) + 1, text_dim, name="genre_embedding")
        self.projection = keras.layers.Dense(dim, name="projection")

    def call(self, features):
        ids = self.movie_lookup(features["movie_id"])
        movie = _row_masked(self.movie_embedding(ids), ids, self.rows)
        words = self.title_vectorizer(features["title"])
        title = self.title_pooling(self.title_embedding(words), mask=ops.not_equal(words, 0))
        # `genre_list` is padded with "" (the lookup's out-of-vocabulary index 0, which no
        # real genre has): average the embeddings of the real genres, as the TFRS tower
        # does over its ragged split.
        genre_ids = self.genre_lookup(features["genre_list"])
        present = ops.cast(ops.not_equal(genre_ids, 0), "float32")[..., None]
        genre = ops.sum(self.genre_embedding(genre_ids) * present, axis=1) / ops.maximum(
            ops.sum(present, axis=1), 1.0)
        return self.projection(ops.concatenate([movie, title, genre], axis=-1))


class TwoTowerModel(keras.Model):
    """Both towers and the retrieval loss (in-batch softmax), written the keras-rs way."""

    def __init__(self, vocab: Vocabulary, args):
        super().__init__(name="two_tower")
        keras_rs = _keras_rs()
        self.logq = args.logq
        self.remove_accidental_hits = args.remove_accidental_hits
        self.query_model = QueryTower(vocab, args.embedding_dim, args.id_dim,
                                      "timestamp" in args.query_features)
        self.candidate_model = CandidateTower(vocab, args.embedding_dim, args.id_dim,
                                              args.text_dim)
        self.logq_correction = keras_rs.layers.SamplingProbabilityCorrection()
        # Summed over the batch, as tfrs.tasks.Retrieval's default loss.
        self.retrieval_loss = keras.losses.CategoricalCrossentropy(
            from_logits=True, reduction="sum")

    def build(self, input_shape=None):
        # The towers build on their first call (build_model calls them on a sample);
        # this model has no variables of its own.
        self.built = True

    def set_row_masks(self, user_rows, movie_rows):
        """Only the rows marked True of the user / movie id tables get gradients.

        Call before the model is trained (the train step is traced with them).
        """
        self.query_model.rows = None if user_rows is None else np.asarray(user_rows, bool)
        self.candidate_model.rows = None if movie_rows is None else np.asarray(movie_rows, bool)

    def call(self, features, training=False):
        return {"query": self.query_model(features), "candidate": self.candidate_model(features)}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        query, candidate = y_pred["query"], y_pred["candidate"]
        scores = ops.matmul(query, ops.transpose(candidate))
        labels = ops.eye(ops.shape(scores)[0], dtype=scores.dtype)
        if self.logq:
            # In-batch negatives are drawn in proportion to popularity; subtracting
            # log(probability) from the logits removes that bias (Yi et al., 2019).
            probability = ops.broadcast_to(ops.expand_dims(x["probability"], 0),
                                           ops.shape(scores))
            scores = self.logq_correction(scores, probability)
        if self.remove_accidental_hits:
            # Another row of the batch with the same movie is not a negative.
            ids = self.candidate_model.movie_lookup(x["movie_id"])
            same = ops.cast(ops.equal(ids[:, None], ids[None, :]), scores.dtype)
            scores = scores + (same - labels) * MIN_FLOAT
        loss = self.retrieval_loss(labels, scores)
        if self.losses:
            loss = loss + ops.sum(self.losses)
        return loss


def build_model(vocab: Vocabulary, args, seed: int) -> TwoTowerModel:
    """The Keras 3 two-tower model, built (its variable paths start at the towers)."""
    keras.utils.set_random_seed(seed)
    model = TwoTowerModel(vocab, args)
    sample = {"user_id": np.asarray(vocab.users[:2]), "timestamp": np.zeros(2, np.int64),
              **{k: v[:2] for k, v in catalogue_features(vocab).items()}}
    # The towers first, on their own: their variables are then named from the towers
    # down (`query/user_embedding/embeddings`), as the TFRS model's are.
    model.query_model(sample)
    model.candidate_model(sample)
    model(sample)
    return model


def train(model, dataset, epochs, learning_rate, verbose):
    """Adagrad (as the TFRS path); returns the epochs' timings."""
    model.compile(optimizer=keras.optimizers.Adagrad(learning_rate))
    timer = _common.make_timer(per="epoch")
    model.fit(dataset, epochs=epochs, verbose=verbose, callbacks=[timer])
    return timer


def _batches(features: dict, size: int):
    n = len(next(iter(features.values())))
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in features.items()}


def candidate_embeddings(model, vocab: Vocabulary) -> np.ndarray:
    return np.concatenate([ops.convert_to_numpy(model.candidate_model(b))
                           for b in _batches(catalogue_features(vocab), 2048)])


def query_embeddings(model, user_ids, timestamps) -> np.ndarray:
    return np.concatenate([
        ops.convert_to_numpy(model.query_model(b))
        for b in _batches({"user_id": np.asarray(user_ids), "timestamp": timestamps}, 4096)])


def evaluate(model, vocab: Vocabulary, ev: EvalSet, verbose: int) -> dict:
    """The shared metrics, plus the retrieval loss on the evaluation ratings."""
    import tensorflow as tf

    if getattr(model, "optimizer", None) is None:  # `none`: evaluated, never compiled
        model.compile(optimizer=keras.optimizers.Adagrad(0.1))
    ds = tf.data.Dataset.from_tensor_slices(ev.ratings).batch(4096)
    logs = model.evaluate(ds, return_dict=True, verbose=verbose)
    out = retrieval_metrics(query_embeddings(model, ev.ratings["user_id"],
                                             ev.ratings["timestamp"]),
                            query_embeddings(model, ev.users, ev.query_time),
                            candidate_embeddings(model, vocab), ev)
    out["eval_loss"] = float(logs["loss"])
    return out


def recommend(model, vocab: Vocabulary, data, parts, ev: EvalSet, users: int = 3,
              k: int = 5) -> list[dict]:
    """Top-`k` movies for a few evaluation users from keras-rs' `BruteForceRetrieval`.

    It has no exclusions: it retrieves `k` plus the length of the longest
    history, and the movies a user rated before are dropped from their list.
    """
    keras_rs = _keras_rs()
    titles = data.titles_by_id()
    chosen = pick_users(ev, users)
    histories = [user_history(data, parts, str(ev.users[i])) for i in chosen]
    depth = min(len(vocab.movie_ids), k + max((len(h) for h in histories), default=0))
    index = keras_rs.layers.BruteForceRetrieval(
        candidate_embeddings=candidate_embeddings(model, vocab), k=depth, return_scores=False)
    queries = query_embeddings(model, ev.users[chosen], ev.query_time[chosen])
    found = ops.convert_to_numpy(index(queries))
    out = []
    for row, i in enumerate(chosen):
        history = histories[row]
        picks = [str(vocab.movie_ids[j]) for j in found[row]
                 if str(vocab.movie_ids[j]) not in set(history)][:k]
        relevant = {str(vocab.movie_ids[j]) for j in ev.relevant[i]}
        out.append({
            "user": str(ev.users[i]),
            "new_user": bool(ev.new_user[i]),
            "history": [titles[m] for m in history[-5:]],
            "recommended": [{"title": titles.get(m, m), "rated_later": m in relevant}
                            for m in picks],
            "index": "brute force (keras-rs)",
        })
    return out
