"""Real processes killed with SIGKILL mid-training resume and end like an uninterrupted run.

Each run is tests/resume_worker.py in its own process: `auto` rules, LoRA
adapters, gradual unfreezing by steps (the optimizer is rebuilt mid-run),
Dropout, and a NaN batch per epoch skipped by `skip_nonfinite`. The resumed
process wraps its model with a plain policy: the one in force must come back
from the backup.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "resume_worker.py")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONHASHSEED="0")


def start(out, *args):
    return subprocess.Popen([sys.executable, WORKER, str(out), *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc, expect=0):
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == expect, err.decode()[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, started once and awaited by whoever needs it first."""
    out = tmp_path_factory.mktemp("reference")
    proc = start(out)
    state = {"waited": False}

    def get():
        if not state["waited"]:
            finish(proc)
            state["waited"] = True
        return load(out)

    yield get
    if proc.poll() is None:
        proc.kill()


def load(out):
    with open(out / "result.json") as f:
        result = json.load(f)
    return dict(np.load(out / "weights.npz")), dict(np.load(out / "optimizer.npz")), result


def assert_same_run(resumed, reference):
    weights, slots, result = resumed
    ref_weights, ref_slots, ref_result = reference
    assert weights.keys() == ref_weights.keys()
    for path in ref_weights:
        np.testing.assert_allclose(weights[path], ref_weights[path], rtol=1e-6, atol=1e-7,
                                   err_msg=path)
    assert slots.keys() == ref_slots.keys()  # the adapters' Adam slots included
    for path in ref_slots:
        np.testing.assert_allclose(slots[path], ref_slots[path], rtol=1e-6, atol=1e-7,
                                   err_msg=path)
    for key in ("rules", "trainable", "skipped_steps", "stage"):
        assert result[key] == ref_result[key], key
    # The epochs the resumed process ran log what the uninterrupted run logged.
    n = result["epochs_run"]
    for name, values in ref_result["history"].items():
        np.testing.assert_allclose(result["history"][name], values[-n:], rtol=1e-6)


def test_keras_backup_and_restore_survives_sigkill_mid_epoch(tmp_path, reference):
    """Keras' own callback, backing up at epoch ends; killed in the middle of epoch 2."""
    backup = tmp_path / "backup"
    killed = start(tmp_path / "killed", "--callback", "keras", "--backup", backup,
                   "--kill-at-step", "14")
    finish(killed, expect=-signal.SIGKILL)
    resumed = start(tmp_path / "resumed", "--callback", "keras", "--backup", backup, "--resume")
    finish(resumed)
    result = load(tmp_path / "resumed")
    assert result[2]["epochs_run"] == 2  # epochs 2 and 3: epoch 2 ran again from its start
    assert_same_run(result, reference())


def test_peft_backup_and_restore_survives_sigkill_while_writing_a_backup(tmp_path, reference):
    """keras_peft.BackupAndRestore every 5 batches; killed while writing the third backup.

    The second backup (epoch 1, 4 of 6 batches done) is the one restored: the
    half-written file is ignored, the resumed run passes over the 4 batches
    already trained and continues from the fifth.
    """
    backup = tmp_path / "backup"
    killed = start(tmp_path / "killed", "--callback", "peft", "--backup", backup,
                   "--save-freq", "5", "--kill-in-save", "3")
    finish(killed, expect=-signal.SIGKILL)
    with open(backup / "backup.json") as f:
        pointer = json.load(f)["current"]
    assert (pointer["epoch"], pointer["batches_done"]) == (1, 4)
    assert len(os.listdir(backup)) == 3  # pointer, second backup, half of the third
    resumed = start(tmp_path / "resumed", "--callback", "peft", "--backup", backup,
                    "--save-freq", "5", "--resume")
    finish(resumed)
    result = load(tmp_path / "resumed")
    assert result[2]["epochs_run"] == 3
    assert_same_run(result, reference())
    assert not backup.exists()  # fit completed: backups deleted
