"""The two-tower recommender recipe: MovieLens loaders, splits, strategies, end to end."""

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


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_tower")
    result = recipe.main(FAST + ["--compare", "user_embeddings,query_tower,lora_embeddings",
                                 "--output-dir", str(out)])
    return result, out


def test_compare_writes_json_and_table(compared):
    result, out = compared
    with open(out / "comparison.json") as f:
        saved = json.load(f)
    assert [r["strategy"] for r in saved["runs"]] == [
        "none", "user_embeddings", "query_tower", "lora_embeddings"]
    assert saved["runs"] == result["runs"]
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
        assert len(user["recommended"]) == 5 and user["index"] in ("brute force", "ScaNN")
        assert not {r["title"] for r in user["recommended"]} & set(user["history"])


def test_frozen_candidate_tower_stays_bit_identical():
    args = recipe.parse_args(FAST)
    data = ml.synthetic(num_users=30, num_items=40, num_ratings=600)
    parts = ml.split(data)
    vocab = recipe.build_vocabulary(data, parts, 100)
    model = recipe.build_model(vocab, args, seed=0)
    keras_peft.wrap(model, recipe.strategy_rules("query_tower", model, args))
    before = {p: v.numpy().copy() for p, v in zip(keras_peft.variable_paths(model),
                                                 model.weights)}
    recipe.train(model, recipe.make_dataset(data, parts.adapt, 64, 0), 1, 0.1, 0)
    moved = {p for p, v in zip(keras_peft.variable_paths(model), model.weights)
             if not np.array_equal(before[p], v.numpy())}
    assert moved == {"query/user_embedding/embeddings", "query/projection/kernel",
                     "query/projection/bias"}


def test_unknown_strategy_and_bad_query_feature_are_refused():
    with pytest.raises(SystemExit):
        recipe.parse_args(["--compare", "none,everything"])
    with pytest.raises(SystemExit):
        recipe.parse_args(["--query-features", "age"])


def test_without_legacy_keras_the_recipe_says_what_to_do(tmp_path):
    out = str(tmp_path)
    code = textwrap.dedent(f"""
        import sys
        import tensorflow as tf
        tf.keras.layers.Dense  # tf.keras is loaded (as Keras 3) before the recipe is imported
        sys.path.insert(0, {RECIPES!r})
        import two_tower_recommender
        try:
            two_tower_recommender.main(["--data", "synthetic", "--output-dir", {out!r}])
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


# ---------------------------------------------------------------- real data
@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(MOVIELENS_SMALL), reason="ml-latest-small not present")
def test_movielens_latest_small_time_split_end_to_end(tmp_path):
    result = recipe.main(["--data", MOVIELENS_SMALL, "--compare", "query_tower",
                          "--epochs", "3", "--adapt-epochs", "3", "--verbose", "0",
                          "--output-dir", str(tmp_path)])
    random_top_100 = result["data"]["random_top_100"]
    assert result["data"]["movies"] == 9742 and random_top_100 == pytest.approx(0.0103, abs=1e-4)
    for run in result["runs"]:
        assert run["top_100"] > 3 * random_top_100, run
        assert run["recall_100"] > 3 * random_top_100, run
