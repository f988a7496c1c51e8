"""MovieLens ratings for the two-tower recipe: local folders, TFDS, and the splits.

`load_ratings(spec)` returns a `MovieLens` (ratings plus the movie catalogue):

- a local folder in the layout of **ml-latest-small** (`ratings.csv` with a
  `userId,movieId,rating,timestamp` header and `movies.csv` with
  `movieId,title,genres`, genres separated by `|`), as GroupLens ships it;
- a local folder in the layout of **ml-100k** (`u.data`: tab-separated
  `user item rating timestamp`, no header; `u.item`: `|`-separated, Latin-1,
  `id|title|release date|video release date|IMDb URL|` then 19 genre flags;
  genre names from `u.genre` when present);
- `tfds:NAME` (e.g. `tfds:movielens/100k-ratings`), read with
  tensorflow-datasets (which downloads it once; this needs internet).

A file that cannot be read as asked (missing, a missing column, a non-numeric
id or timestamp, a rating of a movie not in the catalogue) raises
`MovieLensError` naming the file, the line and what to change.

`split(data, ...)` divides the ratings into a pretraining period, an
adaptation period and an evaluation period (see its docstring).

This module is recipe code, not part of the keras_peft library.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import os

import numpy as np

__all__ = ["MovieLens", "MovieLensError", "Split", "load_ratings", "load_folder",
           "load_tfds", "split", "synthetic"]

TFDS_PREFIX = "tfds:"
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)


class MovieLensError(ValueError):
    """Ratings cannot be read as asked; the message says why and what to do."""


@dataclasses.dataclass
class MovieLens:
    """Ratings (one entry per rating) and the movie catalogue.

    Ids are strings (as the recipe's lookup layers take them); `genres` are
    `|`-separated genre names; `timestamp` is seconds since 1970 (int64).
    """

    user: np.ndarray  # str
    item: np.ndarray  # str
    rating: np.ndarray  # float32
    timestamp: np.ndarray  # int64
    movie_ids: np.ndarray  # str, the catalogue
    titles: np.ndarray  # str
    genres: np.ndarray  # str, "Action|Comedy"
    source: str

    def __len__(self) -> int:
        return len(self.user)

    def titles_by_id(self) -> dict[str, str]:
        return dict(zip(self.movie_ids.tolist(), self.titles.tolist()))


# ---------------------------------------------------------------- local files
def _need(folder: str, name: str, layout: str) -> str:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise MovieLensError(
            f"{path}: file not found. A {layout} folder needs it; see "
            "recipes/two_tower_recommender.py --help for the two layouts it reads."
        )
    return path


def _int(value: str, path: str, line: int, column: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise MovieLensError(
            f"{path}, line {line}: {column} {value!r} is not an integer. Check that "
            "the file is the MovieLens file it is named after, with the same columns "
            "and delimiter."
        ) from None


def _float(value: str, path: str, line: int, column: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MovieLensError(f"{path}, line {line}: {column} {value!r} is not a number.") from None


def _check_catalogue(items: list[str], known: set[str], ratings_path: str, lines: list[int],
                     movies_path: str) -> None:
    for item, line in zip(items, lines):
        if item not in known:
            raise MovieLensError(
                f"{ratings_path}, line {line}: movie {item} is not in {movies_path}. The "
                "two files must come from the same MovieLens release."
            )


def _read_latest(folder: str) -> MovieLens:
    ratings_path = _need(folder, "ratings.csv", "ml-latest-small (ratings.csv + movies.csv)")
    movies_path = _need(folder, "movies.csv", "ml-latest-small (ratings.csv + movies.csv)")

    movie_ids, titles, genres = [], [], []
    with open(movies_path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        expected = ["movieId", "title", "genres"]
        if header != expected:
            raise MovieLensError(
                f"{movies_path}, line 1: header {header} is not {expected}, the "
                "header of ml-latest-small's movies.csv."
            )
        for line, row in enumerate(reader, start=2):
            if len(row) != 3:
                raise MovieLensError(
                    f"{movies_path}, line {line}: {len(row)} fields, expected 3 "
                    "(movieId,title,genres; quote titles that contain commas)."
                )
            movie_ids.append(str(_int(row[0], movies_path, line, "movieId")))
            titles.append(row[1])
            genres.append("" if row[2] == "(no genres listed)" else row[2])

    users, items, ratings, stamps, lines = [], [], [], [], []
    with open(ratings_path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        expected = ["userId", "movieId", "rating", "timestamp"]
        if header is None or header[:4] != expected:
            raise MovieLensError(
                f"{ratings_path}, line 1: header {header} does not start with "
                f"{expected}, the columns of ml-latest-small's ratings.csv."
            )
        for line, row in enumerate(reader, start=2):
            if len(row) < 4:
                raise MovieLensError(
                    f"{ratings_path}, line {line}: {len(row)} fields, expected 4 "
                    "(userId,movieId,rating,timestamp)."
                )
            users.append(str(_int(row[0], ratings_path, line, "userId")))
            items.append(str(_int(row[1], ratings_path, line, "movieId")))
            ratings.append(_float(row[2], ratings_path, line, "rating"))
            stamps.append(_int(row[3], ratings_path, line, "timestamp"))
            lines.append(line)
    _check_catalogue(items, set(movie_ids), ratings_path, lines, movies_path)
    return _make(users, items, ratings, stamps, movie_ids, titles, genres, folder)


def _read_100k(folder: str) -> MovieLens:
    data_path = _need(folder, "u.data", "ml-100k (u.data + u.item)")
    item_path = _need(folder, "u.item", "ml-100k (u.data + u.item)")
    names = list(ML100K_GENRES)
    genre_path = os.path.join(folder, "u.genre")
    if os.path.isfile(genre_path):
        with open(genre_path, encoding="latin-1") as f:
            pairs = [ln.strip().split("|") for ln in f if ln.strip()]
        try:
            names = [name for name, _ in sorted(pairs, key=lambda p: int(p[1]))]
        except (ValueError, IndexError):
            raise MovieLensError(
                f"{genre_path}: expected lines `name|index`; received e.g. {pairs[:1]}."
            ) from None

    movie_ids, titles, genres = [], [], []
    with open(item_path, encoding="latin-1") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            row = text.rstrip("\n").split("|")
            if len(row) != 5 + len(names):
                raise MovieLensError(
                    f"{item_path}, line {line}: {len(row)} `|`-separated fields, expected "
                    f"{5 + len(names)} (id|title|release date|video release date|IMDb URL|"
                    f"{len(names)} genre flags), the layout of ml-100k's u.item."
                )
            movie_ids.append(str(_int(row[0], item_path, line, "movie id")))
            titles.append(row[1])
            flags = row[5:]
            genres.append("|".join(n for n, flag in zip(names, flags) if flag.strip() == "1"))

    users, items, ratings, stamps, lines = [], [], [], [], []
    with open(data_path, encoding="latin-1") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            row = text.split()
            if len(row) != 4:
                raise MovieLensError(
                    f"{data_path}, line {line}: {len(row)} fields, expected 4 "
                    "(user id, item id, rating, timestamp, tab-separated), the layout "
                    "of ml-100k's u.data."
                )
            users.append(str(_int(row[0], data_path, line, "user id")))
            items.append(str(_int(row[1], data_path, line, "item id")))
            ratings.append(_float(row[2], data_path, line, "rating"))
            stamps.append(_int(row[3], data_path, line, "timestamp"))
            lines.append(line)
    _check_catalogue(items, set(movie_ids), data_path, lines, item_path)
    return _make(users, items, ratings, stamps, movie_ids, titles, genres, folder)


def _make(users, items, ratings, stamps, movie_ids, titles, genres, source) -> MovieLens:
    if not users:
        raise MovieLensError(f"{source}: there are no ratings.")
    return MovieLens(
        user=np.asarray(users, dtype=object).astype(str),
        item=np.asarray(items, dtype=object).astype(str),
        rating=np.asarray(ratings, dtype=np.float32),
        timestamp=np.asarray(stamps, dtype=np.int64),
        movie_ids=np.asarray(movie_ids, dtype=object).astype(str),
        titles=np.asarray(titles, dtype=object).astype(str),
        genres=np.asarray(genres, dtype=object).astype(str),
        source=source,
    )


def load_folder(folder: str) -> MovieLens:
    """Reads a local MovieLens folder in the ml-latest-small or the ml-100k layout."""
    if not os.path.isdir(folder):
        raise MovieLensError(
            f"{folder}: not a folder. Pass a MovieLens folder (ml-latest-small: "
            "ratings.csv + movies.csv; ml-100k: u.data + u.item) or tfds:movielens/100k-ratings."
        )
    if os.path.isfile(os.path.join(folder, "ratings.csv")) or os.path.isfile(
        os.path.join(folder, "movies.csv")
    ):
        return _read_latest(folder)
    if os.path.isfile(os.path.join(folder, "u.data")) or os.path.isfile(
        os.path.join(folder, "u.item")
    ):
        return _read_100k(folder)
    raise MovieLensError(
        f"{folder}: found neither ratings.csv + movies.csv (ml-latest-small) nor "
        f"u.data + u.item (ml-100k). Files there: {sorted(os.listdir(folder))[:8]}."
    )


# ----------------------------------------------------------------------- TFDS
def load_tfds(name: str, data_dir: str | None = None) -> MovieLens:
    """Reads a TFDS MovieLens ratings dataset (`movielens/100k-ratings`, ...)."""
    import tensorflow_datasets as tfds

    try:
        ds, info = tfds.load(name, split="train", with_info=True, data_dir=data_dir)
    except Exception as e:  # download errors come in many types
        raise MovieLensError(
            f"tfds:{name} could not be loaded ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}). "
            "Without internet, point --data at a local MovieLens folder instead "
            "(e.g. --data ../shared/data/movielens-latest-small)."
        ) from None
    genre_feature = info.features["movie_genres"]
    genre_names = getattr(getattr(genre_feature, "feature", None), "names", None)
    users, items, ratings, stamps = [], [], [], []
    catalogue: dict[str, tuple[str, str]] = {}
    for ex in tfds.as_numpy(ds):
        item = _text(ex["movie_id"])
        users.append(_text(ex["user_id"]))
        items.append(item)
        ratings.append(float(ex["user_rating"]))
        stamps.append(int(ex["timestamp"]))
        if item not in catalogue:
            ids = np.atleast_1d(ex["movie_genres"]).tolist()
            genres = [
                genre_names[i] if genre_names and 0 <= i < len(genre_names) else str(i)
                for i in ids
            ]
            genres = [g for g in dict.fromkeys(genres) if g != "(no genres listed)"]
            catalogue[item] = (_text(ex["movie_title"]), "|".join(genres))
    movie_ids = list(catalogue)
    return _make(users, items, ratings, stamps, movie_ids,
                 [catalogue[m][0] for m in movie_ids], [catalogue[m][1] for m in movie_ids],
                 f"tfds:{name}")


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def load_ratings(spec: str, data_dir: str | None = None) -> MovieLens:
    """`tfds:NAME` or a local folder (ml-latest-small or ml-100k layout)."""
    if spec.startswith(TFDS_PREFIX):
        return load_tfds(spec[len(TFDS_PREFIX):], data_dir=data_dir)
    return load_folder(spec)


# --------------------------------------------------------------------- splits
@dataclasses.dataclass
class Split:
    """Indices into the ratings of each period, and how they were chosen."""

    pretrain: np.ndarray
    adapt: np.ndarray
    evaluate: np.ndarray
    description: str

    def sizes(self) -> dict[str, int]:
        return {"pretrain": len(self.pretrain), "adapt": len(self.adapt),
                "evaluate": len(self.evaluate)}


def parse_cutoff(value: str | float, timestamps: np.ndarray) -> int:
    """A quantile of the timestamps (`0.8`) or a date (`2016-03-22`) -> seconds."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            try:
                day = datetime.date.fromisoformat(value)
            except ValueError:
                raise MovieLensError(
                    f"--cutoff {value!r} is neither a fraction in (0, 1) nor a date "
                    "YYYY-MM-DD."
                ) from None
            return int(datetime.datetime(day.year, day.month, day.day,
                                         tzinfo=datetime.timezone.utc).timestamp())
    if not 0.0 < value < 1.0:
        raise MovieLensError(f"--cutoff {value} must be a fraction in (0, 1) or a date.")
    return int(np.quantile(timestamps, value))


def split(data: MovieLens, how: str = "time", cutoff: str | float = 0.8,
          adapt_fraction: float = 0.5, seed: int = 0) -> Split:
    """Pretraining, adaptation and evaluation ratings.

    `how="time"` (default): ratings before `cutoff` (a quantile of the
    timestamps, or a date) are the pretraining period. The later ratings are
    divided per user in time order: each user's first `adapt_fraction` of
    them are the adaptation data, the rest are evaluated. So every evaluated
    rating is later than the cut-off and later than that user's adaptation
    ratings, the shift a deployed recommender meets: new users, new movies,
    changed tastes.

    `how="random"`: the same proportions, drawn at random with `seed` (the
    setting of the TFRS tutorials).
    """
    if not 0.0 < adapt_fraction < 1.0:
        raise MovieLensError(f"--adapt-fraction must be in (0, 1). Received: {adapt_fraction}.")
    n = len(data)
    if how == "time":
        cut = parse_cutoff(cutoff, data.timestamp)
        later = np.flatnonzero(data.timestamp >= cut)
        pretrain = np.flatnonzero(data.timestamp < cut)
        order = later[np.lexsort((later, data.timestamp[later], data.user[later]))]
        adapt, evaluate = [], []
        users = data.user[order]
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
        for start, end in zip(starts, np.r_[starts[1:], len(order)]):
            k = int(np.floor((end - start) * adapt_fraction))
            adapt.extend(order[start:start + k])
            evaluate.extend(order[start + k:end])
        when = datetime.datetime.fromtimestamp(cut, datetime.timezone.utc).date().isoformat()
        description = (
            f"time split: pretrain on ratings before {when}; later ratings per user in "
            f"time order, first {adapt_fraction:.0%} adapt, the rest evaluated"
        )
    elif how == "random":
        fraction = cutoff if isinstance(cutoff, float) else 0.8
        if isinstance(cutoff, str):
            try:
                fraction = float(cutoff)
            except ValueError:
                raise MovieLensError("--split random needs --cutoff as a fraction.") from None
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        k = int(n * fraction)
        rest = perm[k:]
        m = int(len(rest) * adapt_fraction)
        pretrain, adapt, evaluate = perm[:k], rest[:m], rest[m:]
        description = (
            f"random split (seed {seed}): {fraction:.0%} pretrain, then "
            f"{adapt_fraction:.0%} of the rest adapt, the rest evaluated"
        )
    else:
        raise MovieLensError(f"--split must be 'time' or 'random'. Received: {how!r}.")
    result = Split(np.sort(np.asarray(pretrain, np.int64)), np.sort(np.asarray(adapt, np.int64)),
                   np.sort(np.asarray(evaluate, np.int64)), description)
    for name, size in result.sizes().items():
        if size == 0:
            raise MovieLensError(
                f"The {name} period is empty ({description}; {n} ratings). Choose another "
                "--cutoff or --adapt-fraction."
            )
    return result


# ------------------------------------------------------------------ synthetic
def synthetic(num_users: int = 200, num_items: int = 300, num_ratings: int = 6000,
              seed: int = 0) -> MovieLens:
    """Generated ratings with structure a two-tower model can learn (for tests and demos).

    Users and movies belong to one of 5 taste groups; a user rates mostly
    movies of their group. Movie titles contain their group's word, genres
    their group's genre. Timestamps run from 2000 to 2010, and the later half
    of the period shifts users towards the next group (a taste drift).
    """
    rng = np.random.default_rng(seed)
    groups = 5
    words = ["space", "love", "crime", "ghost", "laugh"]
    genre_names = ["Sci-Fi", "Romance", "Crime", "Horror", "Comedy"]
    user_group = rng.integers(groups, size=num_users)
    item_group = rng.integers(groups, size=num_items)
    start, end = 946684800, 1262304000
    stamps = np.sort(rng.integers(start, end, size=num_ratings))
    users = rng.integers(num_users, size=num_ratings)
    drift = stamps > (start + end) // 2
    wanted = (user_group[users] + drift.astype(int)) % groups
    by_group = [np.flatnonzero(item_group == g) for g in range(groups)]
    items = np.array([
        rng.choice(by_group[g]) if rng.random() < 0.85 else rng.integers(num_items)
        for g in wanted
    ])
    titles = [f"{words[g]} story {i} ({1990 + i % 20})" for i, g in enumerate(item_group)]
    genres = [genre_names[g] for g in item_group]
    return _make(
        [str(u) for u in users], [str(i) for i in items],
        rng.integers(1, 6, size=num_ratings).astype(float).tolist(), stamps.tolist(),
        [str(i) for i in range(num_items)], titles, genres, "synthetic",
    )
