"""Segmentation metrics, evaluation, and the recipe's output files.

Metrics come from one confusion matrix accumulated over all validation
pixels (not averaged per image):

- IoU of class c: TP / (TP + FP + FN); a class absent from both the masks
  and the predictions has no IoU (None) and is left out of the mean;
- mean IoU: the mean over classes with an IoU;
- pixel accuracy: correct pixels / all pixels;
- Dice (binary tasks): 2 TP / (2 TP + FP + FN) of class 1, plus per class.

This module is recipe code, not part of the keras_peft library.
"""

from __future__ import annotations

import _common
import numpy as np

__all__ = [
    "atomic_write",
    "confusion_matrix",
    "evaluate",
    "metrics_from_confusion",
    "save_figure",
    "save_panel",
    "write_json",
    "write_text",
]


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """`cm[t, p]` = number of pixels of true class t predicted as p."""
    y_true = np.asarray(y_true).reshape(-1).astype(np.int64)
    y_pred = np.asarray(y_pred).reshape(-1).astype(np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"Shapes differ: {y_true.shape} vs {y_pred.shape}.")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} holds values outside 0..{num_classes - 1}.")
    counts = np.bincount(num_classes * y_true + y_pred, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def _ratio(num, den):
    return None if den == 0 else float(num / den)


def metrics_from_confusion(cm: np.ndarray, class_names=None) -> dict:
    """Per-class IoU and Dice, mean IoU, pixel accuracy (and `dice` for 2 classes)."""
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    iou = [_ratio(tp[c], tp[c] + fp[c] + fn[c]) for c in range(n)]
    dice = [_ratio(2 * tp[c], 2 * tp[c] + fp[c] + fn[c]) for c in range(n)]
    valid = [v for v in iou if v is not None]
    out = {
        "mean_iou": float(np.mean(valid)) if valid else None,
        "pixel_accuracy": _ratio(tp.sum(), cm.sum()),
        "per_class_iou": dict(zip(names, iou)),
        "per_class_dice": dict(zip(names, dice)),
        "pixels": int(cm.sum()),
    }
    if n == 2:
        out["dice"] = dice[1]
    return out


def evaluate(model, dataset, num_classes: int, class_names=None, *, keep: int = 0,
             verbose: int = 1, distributed: bool = False) -> tuple[dict, dict]:
    """Predicts `dataset` (batches of images, masks) and measures it.

    `distributed`: the model was built under a `tf.distribute` strategy. It is then
    called directly on each batch: Keras' `predict_on_batch` under `MirroredStrategy`
    runs every replica on the whole batch and returns the copies concatenated (measured
    with Keras 3.15: twice the rows on two replicas).

    Returns:
        `(metrics, kept)`: `kept` holds the first `keep` images, masks and
        predictions (numpy) for a panel.
    """
    import keras

    cm = np.zeros((num_classes, num_classes), np.int64)
    kept = {"images": [], "masks": [], "predictions": []}
    batches = dataset.cardinality().numpy()
    bar = keras.utils.Progbar(batches if batches > 0 else None, verbose=verbose,
                              unit_name="batch")
    for step, (images, masks) in enumerate(dataset):
        logits = model(images, training=False) if distributed else \
            model.predict_on_batch(images)
        predictions = np.argmax(np.asarray(logits), axis=-1)
        masks = masks.numpy()
        cm += confusion_matrix(masks, predictions, num_classes)
        left = keep - len(kept["images"])
        if left > 0:
            kept["images"].extend(images.numpy()[:left])
            kept["masks"].extend(masks[:left])
            kept["predictions"].extend(predictions[:left])
        bar.update(step + 1)
    metrics = metrics_from_confusion(cm, class_names)
    metrics["confusion_matrix"] = cm.tolist()
    return metrics, {k: np.asarray(v) for k, v in kept.items()}


# ----------------------------------------------------------------- outputs
def atomic_write(path: str, write) -> None:
    """Calls `write(tmp_path)`, then renames the temporary file onto `path` (keras_peft.io).

    The temporary file keeps `path`'s extension (`model.save` needs
    `.keras`), and the result gets the usual permissions (umask), not
    mkstemp's private 0600. The folder is created.
    """
    _common.write_with(path, write)


def write_text(path: str, text: str) -> None:
    _common.write_text(path, text)


def write_json(path: str, data) -> None:
    _common.write_json(path, data, default=_json_default)  # fails before writing


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def save_panel(path: str, columns: dict, *, num_classes: int, title: str = "") -> bool:
    """A grid: one row per image, one column per entry of `columns`.

    `columns` maps a column title to an array of images `(N, H, W, 3)` in
    [0, 1] or of masks `(N, H, W)` of class indices. Returns False (with a
    message) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG panel written.")
        return False
    names = list(columns)
    rows = len(next(iter(columns.values())))
    if rows == 0:
        return False
    fig, axes = plt.subplots(rows, len(names), figsize=(1.9 * len(names), 1.9 * rows + 0.4),
                             squeeze=False)
    for j, name in enumerate(names):
        for i in range(rows):
            ax = axes[i, j]
            value = np.asarray(columns[name][i])
            if value.ndim == 3:
                ax.imshow(np.clip(value, 0, 1))
            else:
                ax.imshow(value, cmap="gray" if num_classes == 2 else "viridis",
                          vmin=0, vmax=max(1, num_classes - 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(path, fig)
    plt.close(fig)
    return True


def save_figure(path: str, fig, dpi: int = 72) -> None:
    """Writes a matplotlib figure to `path` atomically, as a small palette PNG."""
    atomic_write(path, lambda tmp: _save_small_png(fig, tmp, dpi))


def _save_small_png(fig, path, dpi, colors=64):
    """A palette PNG: a few times smaller than matplotlib's RGBA."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    try:
        from PIL import Image
    except ImportError:  # matplotlib's own PNG then
        with open(path, "wb") as f:
            f.write(buffer.getvalue())
        return
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=colors).save(path, format="PNG", optimize=True)
