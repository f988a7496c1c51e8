"""With a seed, the quick-start recipe's fast configuration gives identical metrics on CPU."""

import importlib
import os
import sys

import pytest

RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")


@pytest.fixture(scope="module")
def quickstart():
    sys.path.insert(0, RECIPES)
    try:
        yield importlib.import_module("quickstart")
    finally:
        sys.path.remove(RECIPES)


FAST = ["--epochs", "2", "--seed", "3"]


def without_times(result):
    return {k: v for k, v in result.items() if not k.endswith("_s")}


@pytest.fixture(scope="module")
def first_run(quickstart):
    return without_times(quickstart.main(FAST))


def test_two_seeded_runs_of_the_quickstart_give_identical_metrics(quickstart, first_run):
    second = without_times(quickstart.main(FAST))
    assert second == first_run  # exactly: accuracies are counts over the same examples
    assert first_run["accuracy_after"] > first_run["accuracy_before"]
    assert first_run["skipped_steps"] == 0  # skip_nonfinite is on in the recipe: none to skip


def test_quickstart_resumes_after_a_crash_and_ends_the_same(quickstart, first_run, tmp_path,
                                                            monkeypatch):
    class CrashAfterFirstBackup(quickstart.keras_peft.BackupAndRestore):
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)  # the backup of epoch 0 is written
            raise KeyboardInterrupt

    backup = str(tmp_path / "backup")
    with monkeypatch.context() as patch:
        patch.setattr(quickstart.keras_peft, "BackupAndRestore", CrashAfterFirstBackup)
        with pytest.raises(KeyboardInterrupt):
            quickstart.main([*FAST, "--resume", backup])
    assert os.path.exists(os.path.join(backup, "backup.json"))
    resumed = without_times(quickstart.main([*FAST, "--resume", backup]))
    assert resumed == first_run
    assert not os.path.exists(backup)  # deleted once fine-tuning completed


def test_the_recipe_turns_skip_nonfinite_on_by_default(quickstart):
    assert quickstart.parse_args([]).skip_nonfinite is True
    assert quickstart.parse_args(["--no-skip-nonfinite"]).skip_nonfinite is False
    assert quickstart.parse_args(["--resume", "backup"]).resume == "backup"


def test_fine_tuning_order_depends_only_on_seed_and_epoch(quickstart):
    import numpy as np

    x = np.arange(10, dtype="float32")[:, None]
    a = quickstart.EpochShuffled(x, x, batch_size=4, seed=0)
    b = quickstart.EpochShuffled(x, x, batch_size=4, seed=0)
    a.set_epoch(2)  # e.g. a run resumed at epoch 2 ...
    for epoch in range(3):  # ... and one that got there epoch by epoch
        b.set_epoch(epoch)
    assert len(a) == 3
    for i in range(3):
        np.testing.assert_array_equal(a[i][0], b[i][0])
    b.set_epoch(1)
    assert not np.array_equal(a[0][0], b[0][0])
