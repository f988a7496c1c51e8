"""keras-peft under tf.distribute.MultiWorkerMirroredStrategy: two worker processes on
127.0.0.1 (tests/multiworker_worker.py), tf.keras models.

The cluster's weights must equal a single-device run on the same global batches to
float tolerance, the two workers must hold identical weights, frozen variables keep
their initial values, a delta saved by the chief loads onto a fresh model, and a worker
killed mid-training resumes from `BackupAndRestore` to the uninterrupted result.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "multiworker_worker.py")
TOLERANCE = 1e-6  # float32 sums over 2 workers in another order, over 8-12 Adam steps


def free_ports(n=2):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [str(s.getsockname()[1]) for s in sockets]
    for s in sockets:
        s.close()
    return ports


def cluster(out, *extra, timeout=240):
    """Starts both workers; returns their exit codes. When one dies, the other (blocked in
    a collective) is killed after a grace period; any still running at `timeout` too."""
    ports = free_ports()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), *ports, str(out), *extra],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    deadline, died = time.monotonic() + timeout, None
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if died is None and any(p.poll() not in (None, 0) for p in procs):
            died = time.monotonic()
        if died is not None and time.monotonic() > died + 5:
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    errors = [p.communicate()[1] for p in procs]
    return [p.returncode for p in procs], errors


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("multiworker")
    codes, errors = cluster(out)
    assert codes == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    return [json.loads((out / f"worker-{i}.json").read_text()) for i in range(2)]


@pytest.mark.parametrize("scenario", ["frozen_and_lr_scale", "lora", "rules_changed", "backup"])
def test_two_workers_train_as_one_device_and_agree(results, scenario):
    chief, worker = results
    assert chief["workers"] == 2
    assert chief[scenario]["max_abs_diff"] < TOLERANCE
    assert worker[scenario]["max_abs_diff"] < TOLERANCE
    assert chief[scenario]["checksum"] == worker[scenario]["checksum"]  # bit-identical
    mirrored, single = chief[scenario]["mirrored"], chief[scenario]["single"]
    assert mirrored == single  # frozen variables, decisions, epochs
    if scenario != "rules_changed":  # there block_0 trains from epoch 1 on
        assert mirrored["frozen_identical"] and all(mirrored["frozen_identical"].values())
    else:
        assert mirrored["decisions"] == single["decisions"]


def test_frozen_variables_are_the_ones_the_rules_freeze(results):
    assert set(results[0]["frozen_and_lr_scale"]["mirrored"]["frozen_identical"]) == {
        "block_0/kernel:0", "block_0/bias:0"}
    assert len(results[0]["lora"]["mirrored"]["frozen_identical"]) == 6  # 3 kernels, 3 biases


def test_a_delta_saved_by_the_chief_loads_onto_a_fresh_model(results):
    assert results[0]["lora"]["delta_prediction_diff"] < 1e-6


def test_a_killed_worker_resumes_from_backup_to_the_uninterrupted_weights(tmp_path):
    codes, _ = cluster(tmp_path, "--crash-at-epoch", "2")
    assert codes[1] == 3 and not (tmp_path / "worker-1.json").exists()  # died at epoch 2
    assert os.listdir(tmp_path / "backup")  # epoch 1's backup is there
    codes, errors = cluster(tmp_path)  # the cluster restarts; BackupAndRestore resumes
    assert codes == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    chief, worker = (json.loads((tmp_path / f"worker-{i}.json").read_text()) for i in range(2))
    assert chief["backup"]["mirrored"]["epochs_run"] == [2]  # resumed, not trained again
    assert chief["backup"]["single"]["epochs_run"] == [0, 1, 2]
    assert chief["backup"]["max_abs_diff"] < TOLERANCE  # the single run had no interruption
    assert chief["backup"]["checksum"] == worker["backup"]["checksum"]
