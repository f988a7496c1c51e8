"""The two-tower recommender recipe (TFRS and keras-rs): loaders, splits, strategies, end to end."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.conftest import DATA_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")
if RECIPES not in sys.path:
    sys.path.insert(0, RECIPES)

import _movielens as ml  # noqa: E402
import two_tower_recommender as recipe  # noqa: E402

import keras_peft  # noqa: E402

MOVIELENS_SMALL = os.path.join(DATA_DIR, "movielens-latest-small")


# ------------------------------------------------------------------ loaders
def write(folder, name, text, encoding="utf-8"):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text, encoding=encoding)
    return folder


def latest_small(folder, ratings=None, movies=None):
    write(folder, "movies.csv", movies or (
        "movieId,title,genres\n"
        '1,Toy Story (1995),Adventure|Animation\n'
        '2,"American President, The (1995)",Comedy|Drama|Romance\n'
        "3,Some Film (2001),(no genres listed)\n"))
    write(folder, "ratings.csv", ratings or (
        "userId,movieId,rating,timestamp\n"
        "1,1,4.0,964982703\n1,2,3.5,964981247\n2,3,5.0,1000000000\n"))
    return folder


def ml_100k(folder, data=None, items=None):
    flags = "|".join(["0"] * 19)
    action = "|".join(["0", "1"] + ["0"] * 17)
    write(folder, "u.item", items or (
        f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags}\n"
        f"2|GoldenEye (1995)|01-Jan-1995||http://x|{action}\n"
        f"3|Café (1996)|01-Jan-1996||http://x|{flags}\n"), encoding="latin-1")
    write(folder, "u.data", data or (
        "196\t1\t3\t881250949\n186\t2\t3\t891717742\n22\t3\t1\t878887116\n"))
    return folder


def test_reads_the_ml_latest_small_layout(tmp_path):
    data = ml.load_folder(str(latest_small(tmp_path / "small")))
    assert data.user.tolist() == ["1", "1", "2"]
    assert data.item.tolist() == ["1", "2", "3"]
    assert data.timestamp.tolist() == [964982703, 964981247, 1000000000]
    assert data.titles_by_id()["2"] == "American President, The (1995)"
    assert data.genres.tolist() == ["Adventure|Animation", "Comedy|Drama|Romance", ""]


def test_reads_the_ml_100k_layout(tmp_path):
    data = ml.load_folder(str(ml_100k(tmp_path / "ml-100k")))
    assert data.user.tolist() == ["196", "186", "22"]
    assert data.rating.tolist() == [3.0, 3.0, 1.0]
    assert data.titles.tolist() == ["Toy Story (1995)", "GoldenEye (1995)", "Café (1996)"]
    assert data.genres.tolist() == ["", "Action", ""]


@pytest.mark.parametrize("make, change, message", [
    (latest_small, lambda f: (f / "movies.csv").unlink(), r"movies.csv: file not found"),
    (latest_small, lambda f: write(f, "ratings.csv", "user,movie,rating,time\n1,1,4,5\n"),
     r"ratings.csv, line 1: header .* does not start with \['userId'"),
    (latest_small, lambda f: write(f, "ratings.csv", "userId,movieId,rating,timestamp\n"
                                                     "1,1,4.0,964982703\nx7,1,4.0,1\n"),
     r"ratings.csv, line 3: userId 'x7' is not an integer"),
    (latest_small, lambda f: write(f, "ratings.csv", "userId,movieId,rating,timestamp\n"
                                                     "1,1,4.0,2001-01-01\n"),
     r"ratings.csv, line 2: timestamp '2001-01-01' is not an integer"),
    (latest_small, lambda f: write(f, "ratings.csv", "userId,movieId,rating,timestamp\n"
                                                     "1,99,4.0,5\n"),
     r"ratings.csv, line 2: movie 99 is not in .*movies.csv"),
    (latest_small, lambda f: write(f, "movies.csv", "movieId;title;genres\n1;A;B\n"),
     r"movies.csv, line 1: header \['movieId;title;genres'\] is not"),
    (ml_100k, lambda f: (f / "u.item").unlink(), r"u.item: file not found"),
    (ml_100k, lambda f: write(f, "u.data", "196\t1\t3\n"), r"u.data, line 1: 3 fields, expected 4"),
    (ml_100k, lambda f: write(f, "u.data", "196\tone\t3\t881250949\n"),
     r"u.data, line 1: item id 'one' is not an integer"),
    (ml_100k, lambda f: write(f, "u.item", "1|Toy Story|x|y\n"),
     r"u.item, line 1: 4 `\|`-separated fields, expected 24"),
])
def test_loader_errors_say_where_and_what(tmp_path, make, change, message):
    folder = make(tmp_path / "data")
    change(folder)
    with pytest.raises(ml.MovieLensError, match=message):
        ml.load_folder(str(folder))


def test_folder_without_movielens_files_and_missing_folder(tmp_path):
    write(tmp_path / "other", "notes.txt", "hello")
    with pytest.raises(ml.MovieLensError, match=r"found neither ratings.csv.*notes.txt"):
        ml.load_ratings(str(tmp_path / "other"))
    with pytest.raises(ml.MovieLensError, match="not a folder"):
        ml.load_ratings(str(tmp_path / "absent"))


def test_tfds_loader_with_mock_data():
    with tfds.testing.mock_data(num_examples=30):
        data = ml.load_ratings("tfds:movielens/100k-ratings")
    assert len(data) == 30 and data.source == "tfds:movielens/100k-ratings"
    assert set(data.item) <= set(data.movie_ids)
    assert data.timestamp.dtype == np.int64 and "(no genres listed)" not in "|".join(data.genres)


def test_tfds_failure_points_to_a_local_folder():
    with pytest.raises(ml.MovieLensError, match=r"could not be loaded.*--data"):
        ml.load_ratings("tfds:no_such_dataset_for_keras_peft")


# ------------------------------------------------------------------- splits
def test_time_split_evaluates_only_later_ratings_each_after_the_users_adaptation():
    data = ml.synthetic(num_users=40, num_items=60, num_ratings=2000)
    parts = ml.split(data, "time", cutoff=0.7, adapt_fraction=0.5)
    all_ = np.concatenate([parts.pretrain, parts.adapt, parts.evaluate])
    assert sorted(all_.tolist()) == list(range(len(data)))  # a partition
    later = np.concatenate([parts.adapt, parts.evaluate])
    assert data.timestamp[parts.pretrain].max() < data.timestamp[later].min()
    for user in np.unique(data.user[parts.evaluate]):
        adapt = parts.adapt[data.user[parts.adapt] == user]
        evaluate = parts.evaluate[data.user[parts.evaluate] == user]
        if len(adapt):
            assert data.timestamp[adapt].max() <= data.timestamp[evaluate].min()
    assert abs(len(parts.pretrain) / len(data) - 0.7) < 0.01
    by_date = ml.split(data, "time", cutoff="2006-01-01")
    assert data.timestamp[by_date.pretrain].max() < 1136073600 <= data.timestamp[
        by_date.adapt].min()


def test_random_split_and_split_errors():
    data = ml.synthetic(num_users=40, num_items=60, num_ratings=1000)
    parts = ml.split(data, "random", cutoff="0.8", adapt_fraction=0.5, seed=3)
    assert parts.sizes() == {"pretrain": 800, "adapt": 100, "evaluate": 100}
    with pytest.raises(ml.MovieLensError, match="neither a fraction"):
        ml.split(data, "time", cutoff="last tuesday")
    with pytest.raises(ml.MovieLensError, match="The pretrain period is empty"):
        ml.split(data, "time", cutoff="1990-01-01")


# ------------------------------------------------------------ the recipe
FAST = ["--data", "synthetic", "--epochs", "2", "--adapt-epochs", "3", "--id-dim", "16",
        "--embedding-dim", "16", "--batch-size", "128", "--verbose", "0"]
FRAMEWORKS = ["tfrs", "keras-rs"]


@pytest.fixture(scope="module", params=FRAMEWORKS)
def compared(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_tower")
    result = recipe.main(FAST + ["--framework", request.param, "--compare",
                                 "user_embeddings,query_tower,lora_embeddings",
                                 "--output-dir", str(out)])
    return result, out


def test_compare_writes_json_and_table(compared):
    result, out = compared
    with open(out / "comparison.json") as f:
        saved = json.load(f)
    assert [r["strategy"] for r in saved["runs"]] == [
        "none", "user_embeddings", "query_tower", "lora_embeddings"]
    assert saved["runs"] == result["runs"]
    assert {r["framework"] for r in saved["runs"]} == {result["settings"]["framework"]}
    assert "| lora_embeddings |" in (out / "comparison.md").read_text()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_trainable_parameters_follow_each_strategy(compared):
    runs = {r["strategy"]: r for r in compared[0]["runs"]}
    users = compared[0]["data"]["vocabulary_users"]
    assert runs["none"]["trainable_params"] == 0
    assert runs["user_embeddings"]["trainable_params"] == (users + 1) * 16
    assert runs["query_tower"]["trainable_params"] == (users + 1) * 16 + 16 * 16 + 16
    movies = compared[0]["data"]["movies"]
    assert runs["lora_embeddings"]["trainable_params"] == (users + 1 + movies + 1) * 4 + 2 * 4 * 16


def test_adaptation_recovers_the_drifted_tastes(compared):
    """Synthetic users drift to another taste group after the cut-off; adapting helps."""
    runs = {r["strategy"]: r for r in compared[0]["runs"]}
    for name in ("user_embeddings", "query_tower"):
        assert runs[name]["recall_10"] > runs["none"]["recall_10"] + 0.05, runs
        assert runs[name]["top_10"] > runs["none"]["top_10"], runs


def test_recommendations_come_from_the_index_and_skip_history(compared):
    recs = compared[0]["recommendations"]
    assert recs["strategy"] == "lora_embeddings" and len(recs["users"]) == 3
    for user in recs["users"]:
        assert len(user["recommended"]) == 5
        assert user["index"] in ("brute force (TFRS)", "ScaNN", "brute force (keras-rs)")
        assert not {r["title"] for r in user["recommended"]} & set(user["history"])


def test_shared_top_k_matches_tfrs_factorized_top_k(compared):
    """The NumPy top-K accuracy both frameworks report is TFRS' FactorizedTopK.

    Not for lora_embeddings: FactorizedTopK's candidates come from a tf.data map
    traced when the model was built, before LoRA was added, so it scores the
    movies without their LoRA update (the recipe's own metric uses the model as
    adapted).
    """
    if compared[0]["settings"]["framework"] != "tfrs":
        pytest.skip("FactorizedTopK is TFRS' metric")
    for run in compared[0]["runs"]:
        if run["strategy"] != "lora_embeddings":
            for k in recipe.KS:
                assert run[f"top_{k}"] == pytest.approx(run[f"factorized_top_{k}"], abs=1e-6)


@pytest.mark.parametrize("strategy, stale", [("full_finetune", False), ("lora_embeddings", True)])
def test_tfrs_factorized_top_k_scores_movies_without_their_lora_update(strategy, stale):
    """Why the recipe computes top-K itself: TFRS' FactorizedTopK candidates are a tf.data
    map traced when the model is built, so variables changed in place reach it, a LoRA
    update added later does not (the docs' Metrics section)."""
    import _two_tower_tfrs

    args = recipe.parse_args(FAST + ["--framework", "tfrs"])
    data, parts, vocab = small_vocab(args)
    model = recipe.build_model(vocab, args, seed=0)
    keras_peft.wrap(model, recipe.strategy_rules(strategy, model, args))
    rng = np.random.default_rng(0)
    for v in model.trainable_weights:  # a large update of whatever trains
        v.assign(rng.normal(size=v.shape).astype("float32"))
    out = _two_tower_tfrs.evaluate(model, vocab, recipe.make_eval_set(data, parts), 0)
    gaps = [abs(out[f"top_{k}"] - out[f"factorized_top_{k}"]) for k in recipe.KS]
    assert (max(gaps) > 0.01) if stale else (max(gaps) < 1e-6), out


def small_vocab(args, num_users=30, num_items=40, num_ratings=600):
    data = ml.synthetic(num_users=num_users, num_items=num_items, num_ratings=num_ratings)
    parts = ml.split(data)
    return data, parts, recipe.build_vocabulary(data, parts, 100)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_frozen_candidate_tower_stays_bit_identical(framework):
    args = recipe.parse_args(FAST + ["--framework", framework])
    data, parts, vocab = small_vocab(args)
    model = recipe.build_model(vocab, args, seed=0)
    keras_peft.wrap(model, recipe.strategy_rules("query_tower", model, args))
    before = {p: v.numpy().copy() for p, v in zip(keras_peft.variable_paths(model),
                                                 model.weights)}
    recipe.train(model, recipe.make_dataset(data, parts.adapt, 64, 0), 1, 0.1, 0)
    moved = {p for p, v in zip(keras_peft.variable_paths(model), model.weights)
             if not np.array_equal(before[p], v.numpy())}
    assert moved == {"query/user_embedding/embeddings", "query/projection/kernel",
                     "query/projection/bias"}


@pytest.mark.parametrize("hits", ["--no-remove-accidental-hits", "--remove-accidental-hits"])
def test_both_frameworks_build_the_same_model_and_loss(hits):
    """Same variable paths and shapes; with the TFRS model's weights copied into the
    keras-rs model, the same embeddings and the same retrieval loss (logQ, summed; with
    accidental hits removed or not: a batch of 64 ratings of 40 movies has duplicates)."""
    args = recipe.parse_args(FAST + ["--framework", "tfrs", "--query-features", "timestamp",
                                     hits])
    data, parts, vocab = small_vocab(args)
    tfrs_model = recipe.build_model(vocab, args, seed=0)
    args.framework = "keras-rs"
    krs_model = recipe.build_model(vocab, args, seed=1)
    tfrs_shapes = {p: tuple(v.shape) for p, v in zip(keras_peft.variable_paths(tfrs_model),
                                                      tfrs_model.weights)
                   if p.startswith(("query/", "candidate/"))}  # not the TFRS metric's counter
    krs_shapes = dict(zip(keras_peft.variable_paths(krs_model),
                          [tuple(v.shape) for v in krs_model.weights]))
    assert krs_shapes == tfrs_shapes
    assert "query/time_embedding/embeddings" in krs_shapes
    values = dict(zip(keras_peft.variable_paths(tfrs_model), tfrs_model.get_weights()))
    for path, variable in zip(keras_peft.variable_paths(krs_model), krs_model.weights):
        variable.assign(values[path])
    batch = next(iter(recipe.make_dataset(data, parts.adapt, 64)))
    np.testing.assert_allclose(krs_model.candidate_model(batch).numpy(),
                               tfrs_model.candidate_model(batch).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(krs_model.query_model(batch).numpy(),
                               tfrs_model.query_model(batch).numpy(), rtol=1e-5, atol=1e-6)
    tfrs_loss = float(tfrs_model.compute_loss(batch, training=True))
    krs_loss = float(krs_model.compute_loss(x=batch, y_pred=krs_model(batch)))
    assert krs_loss == pytest.approx(tfrs_loss, rel=1e-5)
    assert tfrs_loss > 0
    if hits == "--remove-accidental-hits":  # and removing them changes the loss
        args.remove_accidental_hits = False
        plain = recipe.build_model(vocab, args, seed=1)
        for path, variable in zip(keras_peft.variable_paths(plain), plain.weights):
            variable.assign(values[path])
        plain_loss = float(plain.compute_loss(x=batch, y_pred=plain(batch)))
        assert abs(plain_loss - krs_loss) > 1e-3 * abs(krs_loss)


def with_new_ids(data, new_users=("0", "1", "2"), new_items=("0", "1", "2"),
                 cutoff="2008-01-01"):
    """The synthetic ratings without any rating of these users and movies before `cutoff`."""
    cut = ml.parse_cutoff(cutoff, data.timestamp)
    early = data.timestamp < cut
    keep = ~(early & (np.isin(data.user, new_users) | np.isin(data.item, new_items)))
    return dataclasses.replace(data, user=data.user[keep], item=data.item[keep],
                               rating=data.rating[keep], timestamp=data.timestamp[keep])


def test_new_id_rows_marks_the_ids_first_seen_after_the_cutoff():
    data = with_new_ids(ml.synthetic(num_users=30, num_items=40, num_ratings=900))
    parts = ml.split(data, cutoff="2008-01-01")
    vocab = recipe.build_vocabulary(data, parts, 100)
    rows = recipe.new_id_rows(vocab)
    assert rows["user"].shape == (len(vocab.users) + 1,)
    assert rows["movie"].shape == (len(vocab.movie_ids) + 1,)
    assert not rows["user"][0] and not rows["movie"][0]  # the out-of-vocabulary rows
    assert sorted(vocab.users[rows["user"][1:]].tolist()) == ["0", "1", "2"]
    assert sorted(vocab.movie_ids[rows["movie"][1:]].tolist()) == ["0", "1", "2"]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_new_id_embeddings_train_only_the_new_rows(framework):
    """The row mask: only the new ids' rows of the two id tables move; every other row
    of them, and every other variable, stays bit-identical."""
    args = recipe.parse_args(FAST + ["--framework", framework])
    data = with_new_ids(ml.synthetic(num_users=30, num_items=40, num_ratings=900))
    parts = ml.split(data, cutoff="2008-01-01")
    vocab = recipe.build_vocabulary(data, parts, 100)
    model = recipe.build_model(vocab, args, seed=0)
    rows = recipe.new_id_rows(vocab)
    model.set_row_masks(rows["user"], rows["movie"])
    keras_peft.wrap(model, recipe.strategy_rules("new_id_embeddings", model, args))
    paths = keras_peft.variable_paths(model)
    before = {p: v.numpy().copy() for p, v in zip(paths, model.weights)}
    recipe.train(model, recipe.make_dataset(data, parts.adapt, 64, 0), 2, 0.1, 0)
    after = {p: v.numpy() for p, v in zip(paths, model.weights)}
    moved = {p for p in paths if not np.array_equal(before[p], after[p])}
    assert moved == {"query/user_embedding/embeddings", "candidate/movie_embedding/embeddings"}
    for path, mask in (("query/user_embedding/embeddings", rows["user"]),
                       ("candidate/movie_embedding/embeddings", rows["movie"])):
        changed_rows = np.flatnonzero((before[path] != after[path]).any(axis=1))
        assert set(changed_rows.tolist()) == set(np.flatnonzero(mask).tolist()), path
        np.testing.assert_array_equal(before[path][~mask], after[path][~mask])


def test_retrieval_metrics_on_hand_made_embeddings():
    """Two users, twelve movies; movie i scores 12 - i for every query."""
    from _two_tower_common import EvalSet

    candidates = (12.0 - np.arange(12, dtype=np.float32))[:, None]
    ev = EvalSet(ratings={}, users=np.array(["a", "b"]), relevant=[{11}, {0, 3}],
                 seen=[{0}, set()], new_user=np.array([True, False]),
                 query_time=np.zeros(2, np.int64), target=np.array([2, 11, 0]))
    out = recipe.retrieval_metrics(np.ones((3, 1), np.float32), np.ones((2, 1), np.float32),
                                   candidates, ev)
    # the rated movies rank 2, 11 and 0 among all twelve
    assert out["top_10"] == pytest.approx(2 / 3) and out["top_50"] == 1.0
    # user a: movie 0 (seen) removed, movie 11 is 11th -> missed at 10; user b: both in
    assert out["recall_10"] == pytest.approx(0.5) and out["recall_50"] == 1.0
    assert out["recall_100_new_users"] == 1.0 and out["recall_100_returning_users"] == 1.0


def test_retrieval_metrics_count_ties_against_the_rated_movie():
    from _two_tower_common import EvalSet

    candidates = np.zeros((12, 2), np.float32)  # every movie scores 0: a tie of 12
    ev = EvalSet(ratings={}, users=np.array(["a"]), relevant=[{11}], seen=[set()],
                 new_user=np.array([False]), query_time=np.zeros(1, np.int64),
                 target=np.array([11]))
    out = recipe.retrieval_metrics(np.ones((1, 2), np.float32), np.ones((1, 2), np.float32),
                                   candidates, ev)
    assert out["top_10"] == 0.0 and out["top_50"] == 1.0
    assert out["recall_100_new_users"] is None and out["recall_100_returning_users"] == 1.0


def test_summary_gives_mean_and_spread_over_seeds():
    runs = [{"strategy": "none", "seed": s, "trainable_params": 0, "total_params": 9,
             "train_examples": 0, "recall_10": v, "seconds_per_step": 0.0}
            for s, v in ((0, 0.1), (1, 0.3), (2, 0.2))]
    (row,) = recipe.summarize(runs)
    assert row["seeds"] == [0, 1, 2]
    assert row["recall_10"] == pytest.approx(0.2) and row["recall_10_spread"] == pytest.approx(0.2)
    assert "0.2000 ± 0.2000" in recipe.comparison_table([row])


def test_seeds_and_strategy_options_are_checked():
    assert recipe.parse_args(["--seeds", "0,1,2"]).seeds == [0, 1, 2]
    assert recipe.parse_args(["--seed", "4"]).seeds == [4]
    for bad in (["--seeds", "0,x"], ["--seeds", "1,1"], ["--compare", "none,everything"],
                ["--query-features", "age"], ["--framework", "torchrec"], ["--epochs", "0"]):
        with pytest.raises(SystemExit):
            recipe.parse_args(bad)


def test_without_keras_rs_the_default_is_tfrs_and_keras_rs_says_what_to_do(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "keras_rs" else real(name, *a))
    assert recipe.parse_args([]).framework == "tfrs"
    with pytest.raises(RuntimeError, match=r"keras-rs is not installed.*Python >= 3.11.*"
                                           r"keras-rs==0.4.0.*--framework tfrs"):
        recipe.framework_module("keras-rs")


def test_keras_rs_is_the_default_when_installed():
    pytest.importorskip("keras_rs")
    assert recipe.parse_args([]).framework == "keras-rs"


def test_without_legacy_keras_the_tfrs_recipe_says_what_to_do(tmp_path):
    out = str(tmp_path)
    code = textwrap.dedent(f"""
        import sys
        import tensorflow as tf
        tf.keras.layers.Dense  # tf.keras is loaded (as Keras 3) before the recipe is imported
        sys.path.insert(0, {RECIPES!r})
        import two_tower_recommender
        try:
            two_tower_recommender.main(["--framework", "tfrs", "--data", "synthetic",
                                        "--output-dir", {out!r}])
        except RuntimeError as e:
            print("ERROR:", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["PYTHONPATH"] = ROOT
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "was set after `tf.keras` had been loaded" in done.stdout
    assert not os.listdir(tmp_path)


def test_keras_rs_recipe_runs_in_a_process_without_legacy_keras(tmp_path):
    """A fresh process, no TF_USE_LEGACY_KERAS: the recipe trains Keras 3 models and
    leaves `tf.keras` as Keras 3."""
    pytest.importorskip("keras_rs")
    out = str(tmp_path)
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {RECIPES!r})
        import two_tower_recommender
        result = two_tower_recommender.main(
            ["--framework", "keras-rs", "--data", "synthetic", "--epochs", "1",
             "--adapt-epochs", "1", "--compare", "new_id_embeddings", "--verbose", "0",
             "--output-dir", {out!r}])
        import tensorflow as tf
        print("TF_USE_LEGACY_KERAS" in os.environ, tf.keras.__version__.split(".")[0],
              [r["strategy"] for r in result["runs"]])
    """)
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["PYTHONPATH"] = ROOT
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "False 3 ['none', 'new_id_embeddings']"
    assert os.path.isfile(os.path.join(out, "comparison.json"))


# ---------------------------------------------------------------- real data
@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(MOVIELENS_SMALL), reason="ml-latest-small not present")
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_movielens_latest_small_time_split_end_to_end(tmp_path, framework):
    result = recipe.main(["--framework", framework, "--data", MOVIELENS_SMALL,
                          "--compare", "new_id_embeddings", "--epochs", "3",
                          "--adapt-epochs", "3", "--verbose", "0",
                          "--output-dir", str(tmp_path)])
    random_top_100 = result["data"]["random_top_100"]
    assert result["data"]["movies"] == 9742 and random_top_100 == pytest.approx(0.0103, abs=1e-4)
    assert result["data"]["new_users"] > 0 and result["data"]["new_movies"] > 0
    runs = {r["strategy"]: r for r in result["runs"]}
    for run in runs.values():
        assert run["top_100"] > 3 * random_top_100, run
        assert run["recall_100"] > 3 * random_top_100, run
    # the new users' rows were random before adaptation; training only them helps them
    assert (runs["new_id_embeddings"]["recall_100_new_users"]
            > runs["none"]["recall_100_new_users"]), runs
