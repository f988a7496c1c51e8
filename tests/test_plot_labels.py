"""recipes/_plot_labels.py: the comparison charts' point labels do not overlap.

Matplotlib only (no TensorFlow): a figure with an Agg canvas, no pyplot state.
"""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))

from _plot_labels import place_labels
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

MARKER = 40  # scatter's s, as in the BERT recipe's chart

# The SST-2 comparison's crowded corner (trainable parameters, accuracy): `full`
# and `llrd:0.8` one accuracy point apart at the same x; `lora:8`,
# `top_layers:2` and `auto` close together.
CLOSE = {
    "full": (22.6e6, 0.869),
    "llrd:0.8": (22.6e6, 0.868),
    "lora:8": (446e3, 0.845),
    "top_layers:2": (3.5e6, 0.841),
    "auto": (2.1e6, 0.850),
}

# bench/results/bert_sst2_minilm.json: strategy -> (trainable params, train time (s),
# validation accuracy); four strategies train every parameter (same x on the left panel).
SST2_RUNS = {
    "full": (22566146, 771.2, 0.8695),
    "lora:8": (446210, 765.3, 0.8455),
    "bitfit": (26498, 584.4, 0.8300),
    "top_layers:2": (3549698, 389.0, 0.8415),
    "auto": (22566146, 851.2, 0.8505),
    "head_only": (770, 277.8, 0.8130),
    "llrd:0.8": (22566146, 594.3, 0.8675),
    "auto:0.02": (376322, 211.1, 0.8215),
    "gradual": (22566146, 357.0, 0.8625),
}


def _axes(points, *, log=True, figsize=(5, 4), ylim=None):
    fig = Figure(figsize=figsize, dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for x, y in points:
        ax.scatter(x, y, s=MARKER)
    if log:
        ax.set_xscale("log")
    if ylim:
        ax.set_ylim(*ylim)
    fig.tight_layout()
    return fig, ax


def _text_boxes(fig, annotations):
    """Each label's text box (without its leader line), in display pixels."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    boxes = []
    for ann in annotations:
        ann.update_positions(renderer)
        boxes.append(Text.get_window_extent(ann, renderer))
    return boxes


def _marker_boxes(fig, ax, points):
    r = math.sqrt(MARKER) / 2 * fig.canvas.get_renderer().points_to_pixels(1.0)
    centers = ax.transData.transform(points)
    return [(x - r, y - r, x + r, y + r) for x, y in centers]


def _area(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _overlapping_labels(names, boxes):
    return [(names[i], names[j]) for i in range(len(boxes)) for j in range(i + 1, len(boxes))
            if _area(boxes[i].extents, boxes[j].extents) > 0]


def _check_readable(fig, ax, names, points, annotations):
    boxes = _text_boxes(fig, annotations)
    assert _overlapping_labels(names, boxes) == []
    markers = _marker_boxes(fig, ax, points)
    on_points = [(name, names[j]) for name, box in zip(names, boxes)
                 for j, m in enumerate(markers) if _area(box.extents, m) > 0]
    assert on_points == []
    frame = ax.bbox.extents
    outside = [name for name, box in zip(names, boxes)
               if _area(box.extents, frame) < box.width * box.height - 1e-6]
    assert outside == []
    return boxes


def test_old_fixed_offset_overlaps_on_the_sst2_points():
    """The placement the charts had (every label 4 points up and right) fails the check."""
    names, points = list(CLOSE), list(CLOSE.values())
    fig, ax = _axes(points)
    annotations = [ax.annotate(name, p, xytext=(4, 4), textcoords="offset points", fontsize=8)
                   for name, p in zip(names, points)]
    overlaps = _overlapping_labels(names, _text_boxes(fig, annotations))
    assert ("full", "llrd:0.8") in overlaps


def test_close_sst2_points_get_labels_that_do_not_overlap():
    names, points = list(CLOSE), list(CLOSE.values())
    fig, ax = _axes(points)
    annotations = place_labels(ax, points, names, fontsize=8, marker_size=MARKER)
    assert [a.get_text() for a in annotations] == names
    boxes = _check_readable(fig, ax, names, points, annotations)
    # Each label stays near its point, and one moved off it has a leader line.
    centers = ax.transData.transform(points)
    for ann, box, (x, y) in zip(annotations, boxes, centers):
        distance = math.hypot(box.x0 + box.width / 2 - x, box.y0 + box.height / 2 - y)
        assert distance < 150
        if distance > 60:
            assert ann.arrow_patch is not None


@pytest.mark.parametrize("panel", ["trainable parameters", "training time"])
def test_the_sst2_comparison_panels_are_readable(panel):
    """All nine strategies, in both panels of the chart, with the chart's y range."""
    names = list(SST2_RUNS)
    column = 0 if panel == "trainable parameters" else 1
    points = [(run[column], run[2]) for run in SST2_RUNS.values()]
    fig, ax = _axes(points, log=column == 0, figsize=(5, 4), ylim=(0.42, 0.89))
    annotations = place_labels(ax, points, names, fontsize=8, marker_size=MARKER)
    _check_readable(fig, ax, names, points, annotations)


def test_colors_and_errors():
    points = [(1.0, 1.0), (2.0, 2.0)]
    _, ax = _axes(points, log=False)
    annotations = place_labels(ax, points, ["a", "b"], colors=["red", "blue"])
    assert [a.get_color() for a in annotations] == ["red", "blue"]
    with pytest.raises(ValueError, match="2 points but 1 labels"):
        place_labels(ax, points, ["a"])
    with pytest.raises(ValueError, match="2 points but 3 colors"):
        place_labels(ax, points, ["a", "b"], colors=["r", "g", "b"])


def _bars_hit(fig, ax, boxes, collections):
    """(label, bar) pairs where a label's box covers an error bar's vertical line."""
    hits = []
    for i, box in enumerate(boxes):
        for j, collection in enumerate(collections):
            for (x, y0), (_, y1) in collection.get_segments():
                (bx, by0), (_, by1) = ax.transData.transform([(x, y0), (x, y1)])
                if box.x0 < bx < box.x1 and box.y0 < max(by0, by1) and min(by0, by1) < box.y1:
                    hits.append((i, j))
    return hits


def test_labels_keep_off_error_bars():
    """The segmentation experiment's chart: mean ± std bars, two strategies at ~the same x."""
    runs = {"surgical:stem+0": (83520, 0.569, 0.031), "surgical": (73984, 0.558, 0.003),
            "bitfit": (292146, 0.543, 0.032), "decoder": (290706, 0.534, 0.009),
            "full": (1325970, 0.542, 0.029), "auto": (1325970, 0.553, 0.023),
            "none": (1, 0.509, 0.0)}
    names = list(runs)
    points = [(x, y) for x, y, _ in runs.values()]

    def chart():
        fig = Figure(figsize=(4.6, 3.4), dpi=80)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        avoid, collections = [], []
        for x, y, std in runs.values():
            drawn = ax.errorbar([x], [y], yerr=[std], fmt="o", capsize=3, markersize=4)
            avoid += [*drawn.lines[1], *drawn.lines[2]]
            collections += list(drawn.lines[2])
        ax.set_xscale("log")
        fig.tight_layout()
        return fig, ax, avoid, collections

    fig, ax, avoid, collections = chart()
    old = [ax.annotate(n, p, fontsize=7, xytext=(4, 2), textcoords="offset points")
           for n, p in zip(names, points)]
    assert _bars_hit(fig, ax, _text_boxes(fig, old), collections) != []  # the old placement

    fig, ax, avoid, collections = chart()
    annotations = place_labels(ax, points, names, fontsize=7, marker_size=16, avoid=avoid)
    boxes = _text_boxes(fig, annotations)
    assert _bars_hit(fig, ax, boxes, collections) == []
    assert _overlapping_labels(names, boxes) == []
