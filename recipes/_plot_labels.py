"""Point labels for the recipes' scatter charts that do not sit on each other.

`place_labels(ax, points, labels)` writes one text label per point. For each
label, in order, it tries offsets around the point (the upper right first,
then the other sides, then rings further out) and keeps the first whose text
box, measured with the figure's renderer (`get_window_extent`), overlaps no
label placed before it, no point marker and no artist named in `avoid`, stays
inside the axes, and whose leader line (drawn when a label had to move away
from its point) crosses no other label or point. When no offset is free, it
keeps the one with the least overlap.

Call it last, once the axes' scales, limits and the figure's layout are final
(after `fig.tight_layout()`): boxes are measured in display space, and a later
change of the axes' size moves the points but not the text.

This module is recipe code, not part of the keras_peft library. It needs
matplotlib (>= 3.6) and nothing else.
"""

from __future__ import annotations

import math

__all__ = ["place_labels"]

# Distances from the point to the label (points, beyond the marker's radius),
# and how many directions to try on each ring.
_RINGS = ((1.5, 8), (7.0, 8), (14.0, 16), (24.0, 16), (36.0, 24), (52.0, 24), (72.0, 32))
# Rings from this one on draw a leader line from the label to its point.
_LEADER_FROM_RING = 1
# Ring 0 keeps the old look (label up and to the right) when there is room.
_FIRST_DIRECTIONS = (45, 0, -45, 135, 180, -135, 90, -90)
_FREE = (False, False, False, 0, 0.0, 0.0)


def _directions(ring: int, count: int) -> list[float]:
    if ring < 2:
        return list(_FIRST_DIRECTIONS)
    step = 360.0 / count
    angles = [step * i for i in range(count)]
    # Right side before left, up before down, nearer the horizontal first.
    return sorted(angles, key=lambda a: (math.cos(math.radians(a)) < -1e-9,
                                         abs(math.sin(math.radians(a))),
                                         math.sin(math.radians(a)) < 0))


def _alignment(angle: float) -> tuple[str, str]:
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    ha = "left" if c > 0.3 else "right" if c < -0.3 else "center"
    va = "bottom" if s > 0.3 else "top" if s < -0.3 else "center"
    return ha, va


def _overlap(a, b) -> float:
    """Area shared by two boxes (x0, y0, x1, y1)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _outside(box, frame) -> float:
    """Area of `box` outside `frame`."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    return area - _overlap(box, frame)


def _segment_hits_box(p, q, box) -> bool:
    """Whether the segment p-q passes through `box` (Liang-Barsky clipping)."""
    x0, y0, x1, y1 = box
    dx, dy = q[0] - p[0], q[1] - p[1]
    t0, t1 = 0.0, 1.0
    for d, lo, hi, start in ((dx, x0, x1, p[0]), (dy, y0, y1, p[1])):
        if abs(d) < 1e-12:
            if start <= lo or start >= hi:
                return False
            continue
        a, b = (lo - start) / d, (hi - start) / d
        if a > b:
            a, b = b, a
        t0, t1 = max(t0, a), min(t1, b)
        if t0 >= t1:
            return False
    return True


def _extents(artist, renderer) -> list[tuple]:
    """Boxes in display space that `artist` covers: its window extent, or for a
    collection (an error bar's LineCollection reports no window extent), each
    of its paths' extents, widened by half the line width (a vertical bar's
    path has no width)."""
    box = tuple(artist.get_window_extent(renderer).extents)
    if all(math.isfinite(v) for v in box) and box[2] >= box[0] and box[3] >= box[1]:
        boxes = [box]
    else:
        transform = artist.get_transform()
        boxes = [tuple(path.get_extents(transform).extents) for path in artist.get_paths()]
    widths = artist.get_linewidth() if hasattr(artist, "get_linewidth") else 1.0
    width = max(widths) if hasattr(widths, "__len__") and len(widths) else widths
    pad = max(float(width or 0.0), 1.0) / 2 * renderer.points_to_pixels(1.0)
    return [(x0 - pad, y0 - pad, x1 + pad, y1 + pad) for x0, y0, x1, y1 in boxes]


def _center(box):
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def _best_position(ann, index, renderer, *, centers, markers, obstacles, placed_boxes,
                   leaders, frame, fig_frame, marker_radius_pt):
    """Tries `ann` around its point, ring after ring; returns the best
    `(score, offset, ha, va, box, leader)`, the first free one if any."""
    best = None
    for ring, (gap, count) in enumerate(_RINGS):
        distance = marker_radius_pt + gap
        for angle in _directions(ring, count):
            offset = (distance * math.cos(math.radians(angle)),
                      distance * math.sin(math.radians(angle)))
            ha, va = _alignment(angle)
            ann.xyann = offset
            ann.set_horizontalalignment(ha)
            ann.set_verticalalignment(va)
            box = tuple(ann.get_window_extent(renderer).extents)
            leader = ring >= _LEADER_FROM_RING
            clash = (sum(_overlap(box, other) for other in placed_boxes)
                     + sum(_overlap(box, o) for o in obstacles))
            crossings = sum(_segment_hits_box(p, c, box) for p, c in leaders)
            if leader:
                start, end = centers[index], _center(box)
                crossings += sum(_segment_hits_box(start, end, other)
                                 for other in placed_boxes)
                crossings += sum(_segment_hits_box(start, end, m)
                                 for j, m in enumerate(markers) if j != index)
            outside = _outside(box, frame)
            # Worst first: cut off by the figure's edge, over another label or a
            # point, outside the axes, a leader line through a label or a point.
            score = (_outside(box, fig_frame) > 0, clash > 0, outside > 0, crossings,
                     clash, outside)
            if best is None or score < best[0]:
                best = (score, offset, ha, va, box, leader)
            if score == _FREE:
                break
        if best[0] == _FREE:
            break
    return best


def place_labels(ax, points, labels, *, colors=None, fontsize: float = 8,
                 marker_size: float | None = None, avoid=(), **text_kw) -> list:
    """Labels `points` [(x, y), ...] of `ax` with `labels`, no label over another.

    `colors` (one per point, optional) colours each label and its leader line,
    best the colour of its marker, so that a label moved away from a cluster
    still reads as its point's. `marker_size` is the markers' area in points
    squared, as scatter's `s` (default: matplotlib's, `lines.markersize`
    squared). `avoid`: other artists no label may cover (an error bar's lines,
    say), each by its window extent. Other keyword arguments go to
    `ax.annotate`. Returns the annotations, in the order of `points`.
    """
    import matplotlib as mpl

    points = [(float(x), float(y)) for x, y in points]
    labels = [str(label) for label in labels]
    if len(points) != len(labels):
        raise ValueError(f"{len(points)} points but {len(labels)} labels.")
    default_color = text_kw.pop("color", None)
    if colors is None:
        colors = [default_color] * len(points)
    elif len(colors) != len(points):
        raise ValueError(f"{len(points)} points but {len(colors)} colors.")
    fig = ax.figure.figure  # the root figure, also for an axes in a subfigure
    fig.draw_without_rendering()  # final limits and layout, and a renderer that knows them
    renderer = fig.canvas.get_renderer()
    px_per_pt = renderer.points_to_pixels(1.0)

    if marker_size is None:
        marker_size = mpl.rcParams["lines.markersize"] ** 2
    radius = math.sqrt(marker_size) / 2 * px_per_pt + 1.0  # pixels, with a little room
    centers = [tuple(ax.transData.transform(p)) for p in points]
    markers = [(x - radius, y - radius, x + radius, y + radius) for x, y in centers]
    obstacles = markers + [box for a in avoid for box in _extents(a, renderer)]
    frame = tuple(ax.bbox.extents)
    fig_frame = tuple(fig.bbox.extents)
    marker_radius_pt = radius / px_per_pt

    placed_boxes: list[tuple] = []  # text boxes of the labels placed so far
    leaders: list[tuple] = []  # (point, box center) of those drawn with a leader line
    annotations = []
    for index, (point, label, color) in enumerate(zip(points, labels, colors)):
        ann = ax.annotate(label, point, xytext=(0, 0), textcoords="offset points",
                          fontsize=fontsize, **text_kw)
        best = _best_position(ann, index, renderer, centers=centers, markers=markers,
                              obstacles=obstacles, placed_boxes=placed_boxes, leaders=leaders,
                              frame=frame, fig_frame=fig_frame,
                              marker_radius_pt=marker_radius_pt)
        _, offset, ha, va, box, leader = best
        ann.remove()
        arrowprops = None
        if leader:
            arrowprops = dict(arrowstyle="-", color="0.4" if color is None else color,
                              linewidth=0.6, alpha=0.8, shrinkA=1.0, shrinkB=marker_radius_pt)
            leaders.append((centers[index], _center(box)))
        ann = ax.annotate(label, point, xytext=offset, textcoords="offset points",
                          ha=ha, va=va, fontsize=fontsize, color=color, arrowprops=arrowprops,
                          **text_kw)
        placed_boxes.append(box)
        annotations.append(ann)
    return annotations

