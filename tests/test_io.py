"""Atomic writes (keras_peft.io, save_delta): a crash mid-write keeps the previous file."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors.numpy

import keras_peft
from keras_peft.io import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
from tests.conftest import tiny_mlp

IO_MODULE = os.path.join(os.path.dirname(__file__), "..", "keras_peft", "io.py")
ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_writers_write_and_replace(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "one")
    atomic_write_text(tmp_path / "a.txt", "two")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_write_json(tmp_path / "c.json", {"x": [1, 2]}, sort_keys=True)
    assert (tmp_path / "a.txt").read_text() == "two"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2]}
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.bin", "c.json"]  # no temp files


def test_failure_mid_write_keeps_previous_file_and_removes_temp(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"epoch": 1})
    with pytest.raises(RuntimeError, match="disk went away"), atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write('{"epoch": 2, "acc')  # half written
        raise RuntimeError("disk went away")
    assert json.loads(path.read_text()) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["results.json"]


def test_unserializable_json_touches_nothing(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"ok": True})
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}
    assert os.listdir(tmp_path) == ["m.json"]


def test_argument_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"its folder '.*nowhere' does not exist"):
        atomic_write_text(tmp_path / "nowhere" / "x.txt", "x")
    with pytest.raises(TypeError, match="expects bytes. Received: str"):
        atomic_write_bytes(tmp_path / "x", "text")
    with pytest.raises(TypeError, match="expects a str. Received: bytes"):
        atomic_write_text(tmp_path / "x", b"raw")


def test_sigkill_mid_write_keeps_previous_file(tmp_path):
    """A real writer process killed between writing half the data and the rename."""
    path = tmp_path / "out.txt"
    path.write_text("previous")
    script = textwrap.dedent(f"""
        import importlib.util, os, signal
        spec = importlib.util.spec_from_file_location("kp_io", {IO_MODULE!r})
        io = importlib.util.module_from_spec(spec); spec.loader.exec_module(io)
        with io.atomic_path({str(path)!r}) as tmp:
            with open(tmp, "w") as f:
                f.write("half of the new")
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert path.read_text() == "previous"
    leftovers = [n for n in os.listdir(tmp_path) if n != "out.txt"]
    assert len(leftovers) == 1  # only the temp file, named after the destination
    assert leftovers[0].startswith(".out.tmp-") and leftovers[0].endswith(".txt")


def test_save_delta_killed_mid_write_keeps_previous_delta(tmp_path):
    """save_delta in a process killed while safetensors writes: the old delta still loads."""
    path = tmp_path / "run.safetensors"
    model = tiny_mlp()
    keras_peft.wrap(model, keras_peft.head_only(model))
    keras_peft.save_delta(model, path)
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {ROOT!r})
        import safetensors.numpy
        import keras_peft
        from tests.conftest import tiny_mlp

        def killed_while_writing(tensors, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(b"\\x00" * 100)
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        safetensors.numpy.save_file = killed_while_writing
        model = tiny_mlp(seed=5)
        keras_peft.wrap(model, keras_peft.head_only(model))
        keras_peft.save_delta(model, {str(path)!r})
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120,
                          env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert path.read_bytes() == before
    fresh = keras_peft.load_delta(tiny_mlp(), path)
    np.testing.assert_array_equal(fresh.get_layer("head").kernel.numpy(),
                                  model.get_layer("head").kernel.numpy())


def test_save_delta_failure_mid_write_keeps_previous_delta(tmp_path, monkeypatch):
    path = tmp_path / "run.safetensors"
    model = tiny_mlp()
    keras_peft.wrap(model, keras_peft.head_only(model))
    keras_peft.save_delta(model, path)
    before = path.read_bytes()
    real = safetensors.numpy.save_file

    def fails_after_writing(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        raise KeyboardInterrupt  # e.g. Ctrl-C between the write and the rename

    monkeypatch.setattr(safetensors.numpy, "save_file", fails_after_writing)
    with pytest.raises(KeyboardInterrupt):
        keras_peft.save_delta(tiny_mlp(seed=3), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["run.safetensors"]


def test_temporary_file_keeps_the_extensions_writers_check(tmp_path):
    """Keras refuses to save to a name without `.keras` / `.weights.h5`."""
    model = tiny_mlp()
    with atomic_path(tmp_path / "model.keras") as tmp:
        assert tmp.endswith(".keras")
        model.save(tmp)
    with atomic_path(tmp_path / "model.weights.h5") as tmp:
        assert os.path.basename(tmp).startswith(".model.tmp-") and tmp.endswith(".weights.h5")
        model.save_weights(tmp)
    assert sorted(os.listdir(tmp_path)) == ["model.keras", "model.weights.h5"]
    tiny_mlp(seed=1).load_weights(tmp_path / "model.weights.h5")


def test_written_files_get_the_usual_permissions(tmp_path):
    import stat

    path = tmp_path / "out.txt"
    atomic_write_text(str(path), "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


def test_a_delta_file_gets_the_usual_permissions_too(tmp_path):
    # safetensors writes the file anew, with mode 0600: the permissions are set after it.
    import stat

    model = tiny_mlp()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets=r".*block_0"))
    path = tmp_path / "delta.safetensors"
    keras_peft.save_delta(model, str(path))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
