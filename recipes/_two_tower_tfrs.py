"""The two-tower model on tensorflow-recommenders (tf.keras 2): `--framework tfrs`.

Import this module only after `TF_USE_LEGACY_KERAS=1` is set and before
TensorFlow is first imported with Keras 3 as `tf.keras` (the recipe's `main`
does that); otherwise `require_legacy_keras` says what to do.

This module is recipe code, not part of the keras_peft library.
"""

from __future__ import annotations

import importlib.util

import _common
import numpy as np
import tensorflow as tf
from _two_tower_common import (
    KS,
    EvalSet,
    Vocabulary,
    catalogue_dataset,
    pick_users,
    retrieval_metrics,
    user_history,
)

from keras_peft.tf_keras import require_legacy_keras

NAME = "tfrs"


def _tfrs():
    require_legacy_keras("recipes/two_tower_recommender.py --framework tfrs "
                         "(tensorflow-recommenders)")
    import tensorflow_recommenders as tfrs

    return tfrs


def versions() -> dict:
    import tf_keras

    tfrs = _tfrs()
    return {"tensorflow-recommenders": tfrs.__version__, "tf_keras": tf_keras.__version__,
            "tensorflow": tf.__version__}


def _row_masked(embeddings, ids, rows):
    """`embeddings` where `rows[ids]`, else the same values with no gradient."""
    if rows is None:
        return embeddings
    keep = tf.gather(tf.constant(rows), ids)[..., None]
    return tf.where(keep, embeddings, tf.stop_gradient(embeddings))


class QueryTower(tf.keras.Model):
    """User id (and optionally the request time) -> query embedding."""

    def __init__(self, vocab: Vocabulary, dim: int, id_dim: int, use_time: bool):
        super().__init__(name="query")
        self.use_time = use_time
        self.rows = None  # set_row_masks: rows of the id table that get gradients
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
        ids = self.user_lookup(features["user_id"])
        x = _row_masked(self.user_embedding(ids), ids, self.rows)
        if self.use_time:
            t = self.time_embedding(self.time_buckets(tf.cast(features["timestamp"], tf.float64)))
            x = tf.concat([x, t], axis=-1)
        return self.projection(x)


class CandidateTower(tf.keras.Model):
    """Movie id, title words and genres -> candidate embedding."""

    def __init__(self, vocab: Vocabulary, dim: int, id_dim: int, text_dim: int):
        super().__init__(name="candidate")
        self.rows = None
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
        ids = self.movie_lookup(features["movie_id"])
        movie = _row_masked(self.movie_embedding(ids), ids, self.rows)
        title = self.title_pooling(self.title_embedding(self.title_vectorizer(features["title"])))
        genres = tf.strings.split(features["genres"], "|")
        genres = tf.ragged.boolean_mask(genres, tf.strings.length(genres) > 0)
        genre_vectors = self.genre_embedding(self.genre_lookup(genres))
        count = tf.cast(genre_vectors.row_lengths(), tf.float32)[:, None]
        genre = tf.reduce_sum(genre_vectors, axis=1) / tf.maximum(count, 1.0)
        return self.projection(tf.concat([movie, title, genre], axis=-1))


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

        def set_row_masks(self, user_rows, movie_rows):
            """Only the rows marked True of the user / movie id tables get gradients.

            Call before the model is trained (the train step is traced with them).
            """
            self.query_model.rows = None if user_rows is None else np.asarray(user_rows, bool)
            self.candidate_model.rows = (None if movie_rows is None
                                         else np.asarray(movie_rows, bool))

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


def train(model, dataset, epochs, learning_rate, verbose):
    """Adagrad, as in the TFRS tutorials; returns the epochs' timings."""
    model.compile(optimizer=tf.keras.optimizers.Adagrad(learning_rate))
    timer = _common.make_timer(per="epoch", keras2=True)  # tf.keras: Keras 2
    model.fit(dataset, epochs=epochs, verbose=verbose, callbacks=[timer])
    return timer


def candidate_embeddings(model, vocab: Vocabulary) -> np.ndarray:
    return np.concatenate([model.candidate_model(batch).numpy()
                           for batch in catalogue_dataset(vocab).batch(2048)])


def query_embeddings(model, user_ids, timestamps) -> np.ndarray:
    ds = tf.data.Dataset.from_tensor_slices({"user_id": user_ids, "timestamp": timestamps})
    return np.concatenate([model.query_model(b).numpy() for b in ds.batch(4096)])


def evaluate(model, vocab: Vocabulary, ev: EvalSet, verbose: int) -> dict:
    """The shared metrics, plus TFRS' own `FactorizedTopK` and loss on the evaluation ratings."""
    if model.optimizer is None:  # `none`: evaluated as pretrained, never compiled
        model.compile(optimizer=tf.keras.optimizers.Adagrad(0.1))
    ds = tf.data.Dataset.from_tensor_slices(ev.ratings).batch(4096)
    logs = model.evaluate(ds, return_dict=True, verbose=verbose)
    out = retrieval_metrics(query_embeddings(model, ev.ratings["user_id"],
                                             ev.ratings["timestamp"]),
                            query_embeddings(model, ev.users, ev.query_time),
                            candidate_embeddings(model, vocab), ev)
    for k in KS:
        out[f"factorized_top_{k}"] = float(
            logs[f"factorized_top_k/top_{k}_categorical_accuracy"])
    out["eval_loss"] = float(logs["loss"])
    return out


def recommend(model, vocab: Vocabulary, data, parts, ev: EvalSet, users: int = 3,
              k: int = 5) -> list[dict]:
    """Top-`k` movies for a few evaluation users from a TFRS index over the catalogue."""
    tfrs = _tfrs()
    titles = data.titles_by_id()
    factorized = tfrs.layers.factorized_top_k
    if importlib.util.find_spec("scann") is not None and hasattr(factorized, "ScaNN"):
        index, kind = factorized.ScaNN(model.query_model, k=k), "ScaNN"
    else:
        index, kind = factorized.BruteForce(model.query_model, k=k), "brute force (TFRS)"
    index.index_from_dataset(catalogue_dataset(vocab).batch(1024).map(
        lambda f: (f["movie_id"], model.candidate_model(f))))
    out = []
    for i in pick_users(ev, users):
        user = str(ev.users[i])
        history = user_history(data, parts, user)
        _, ids = index.query_with_exclusions(
            {"user_id": tf.constant([user]), "timestamp": tf.constant([ev.query_time[i]])},
            tf.constant([history or [""]]), k=k)
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
