"""Score found peaks against ground truth: one-to-one matching, precision/recall/F1, centroid RMSE.

**Matching** (:func:`match_peaks`): a found peak and a true spot may pair when they are on the
same panel and at most ``max_dist`` pixels apart (Euclidean, panel-local). Among those candidate
pairs an optimal one-to-one assignment is taken with the Hungarian method
(``scipy.optimize.linear_sum_assignment``) on the sparse candidate set: first the most pairs,
then the smallest total distance, preferring detectable spots over undetectable ones. Candidate
pairs come from a KD-tree (``scipy.spatial.cKDTree``); isolated one-to-one pairs are taken
directly and only the ambiguous rest goes through the assignment.

**Detectable spots.** When the truth has a ``detectable`` array (the simulator's
:class:`~peaknet_pva.simulate.TruthTable`), only detectable spots count: an unmatched detectable
spot is a false negative; a found peak matched to an *undetectable* spot is neither a true nor a
false positive (finding a faint real spot is not an error, missing it is not either). Truth
without ``detectable`` (e.g. a :class:`PeakTable`) counts every spot.

Conventions when a count is zero: precision is 1 when nothing was found, recall is 1 when there
was nothing to find, F1 is 0 when precision + recall is 0, RMSE is NaN (``None`` in
:meth:`Metrics.as_dict`) with no true positive.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from .frames import PeakTable

__all__ = ["Metrics", "evaluate", "evaluate_main", "match_peaks"]

#: Panels are separated by this many pixels in the KD-tree so that they never match.
_PANEL_STRIDE = 1.0e7


def _points(table: Any) -> np.ndarray:
    panel = np.asarray(table.panel, dtype=np.float64)
    return np.stack(
        [panel * _PANEL_STRIDE + np.asarray(table.y, np.float64), np.asarray(table.x, np.float64)], axis=1
    )


def _detectable(truth: Any) -> np.ndarray:
    det = getattr(truth, "detectable", None)
    n = len(np.asarray(truth.panel))
    return np.ones(n, bool) if det is None else np.asarray(det, bool)


def match_peaks(
    found: PeakTable, truth: Any, *, max_dist: float = 1.5
) -> tuple[int, int, int, np.ndarray]:
    """Match one frame's found peaks to its true spots, one to one.

    Args:
        found: the found peaks (``panel``, ``y``, ``x``).
        truth: true spots (``panel``, ``y``, ``x``, optional ``detectable``).
        max_dist: largest centroid distance of a match, pixels (inclusive).

    Returns:
        ``(tp, fp, fn, matched_pairs)``; ``matched_pairs`` is ``(tp, 2)`` int64 of
        ``(found index, truth index)`` for the true positives, sorted by found index.
    """
    if not (max_dist > 0 and math.isfinite(max_dist)):
        raise ValueError(f"max_dist must be a positive number of pixels, got {max_dist!r}")
    n_found = len(np.asarray(found.panel))
    det = _detectable(truth)
    n_truth = det.shape[0]
    n_det = int(det.sum())
    no_pairs = np.zeros((0, 2), np.int64)
    if n_found == 0 or n_truth == 0:
        return 0, n_found, n_det, no_pairs

    tree_f = cKDTree(_points(found))
    tree_t = cKDTree(_points(truth))
    cand = tree_f.sparse_distance_matrix(tree_t, max_dist, output_type="ndarray")
    if cand.shape[0] == 0:
        return 0, n_found, n_det, no_pairs
    fi = cand["i"].astype(np.int64)
    ti = cand["j"].astype(np.int64)
    dist = cand["v"].astype(np.float64)
    # Undetectable spots cost extra so a detectable one wins when both are in reach.
    cost = dist + np.where(det[ti], 0.0, max_dist)

    # Connected components of the bipartite candidate graph; a 1-1 component is its own match.
    graph = coo_matrix((np.ones(fi.size), (fi, n_found + ti)), shape=(n_found + n_truth,) * 2)
    _, label = connected_components(graph, directed=False)
    comp = label[fi]
    comp_edges = np.bincount(comp, minlength=label.max() + 1)
    simple = comp_edges[comp] == 1
    pairs = [np.stack([fi[simple], ti[simple]], axis=1)]
    hard = ~simple
    if hard.any():
        rows, r_idx = np.unique(fi[hard], return_inverse=True)
        cols, c_idx = np.unique(ti[hard], return_inverse=True)
        big = 2.0 * max_dist * (min(rows.size, cols.size) + 1) + 1.0
        dense = np.full((rows.size, cols.size), big)
        dense[r_idx, c_idx] = cost[hard]
        ar, ac = linear_sum_assignment(dense)
        real = dense[ar, ac] < big
        pairs.append(np.stack([rows[ar[real]], cols[ac[real]]], axis=1))
    matched = np.concatenate(pairs, axis=0)
    tp_mask = det[matched[:, 1]]
    tp_pairs = matched[tp_mask]
    tp_pairs = tp_pairs[np.argsort(tp_pairs[:, 0], kind="stable")]
    tp = int(tp_pairs.shape[0])
    fp = n_found - int(matched.shape[0])
    fn = n_det - tp
    return tp, fp, fn, tp_pairs


@dataclass(frozen=True)
class Metrics:
    """Scores over a set of frames (see the module docstring for the conventions).

    ``rmse_px``: root-mean-square centroid distance over true-positive pairs; ``mean_dy``/
    ``mean_dx``: mean found-minus-true offset (a bias check); ``n_truth``: counted (detectable)
    spots; ``n_weak_matched``: found peaks matched to undetectable spots (neither TP nor FP).
    """

    n_frames: int
    n_found: int
    n_truth: int
    tp: int
    fp: int
    fn: int
    n_weak_matched: int
    precision: float
    recall: float
    f1: float
    rmse_px: float
    mean_dy: float
    mean_dx: float

    def as_dict(self) -> dict[str, int | float | None]:
        """Plain Python numbers (NaN → None), ready for JSON."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def evaluate(
    found_tables: Sequence[PeakTable], truth_tables: Sequence[Any], *, max_dist: float = 1.5
) -> Metrics:
    """Match every frame's peaks (:func:`match_peaks`) and pool the counts and distances."""
    if len(found_tables) != len(truth_tables):
        raise ValueError(f"evaluate: {len(found_tables)} found tables but {len(truth_tables)} truth tables")
    tp = fp = fn = n_found = n_truth = 0
    dys: list[np.ndarray] = []
    dxs: list[np.ndarray] = []
    for found, truth in zip(found_tables, truth_tables):
        t, f, n, pairs = match_peaks(found, truth, max_dist=max_dist)
        tp, fp, fn = tp + t, fp + f, fn + n
        n_found += len(np.asarray(found.panel))
        n_truth += int(_detectable(truth).sum())
        if pairs.shape[0]:
            dys.append(np.asarray(found.y, np.float64)[pairs[:, 0]] - np.asarray(truth.y, np.float64)[pairs[:, 1]])
            dxs.append(np.asarray(found.x, np.float64)[pairs[:, 0]] - np.asarray(truth.x, np.float64)[pairs[:, 1]])
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    if dys:
        dy = np.concatenate(dys)
        dx = np.concatenate(dxs)
        rmse = float(np.sqrt(np.mean(dy * dy + dx * dx)))
        mean_dy, mean_dx = float(dy.mean()), float(dx.mean())
    else:
        rmse = mean_dy = mean_dx = float("nan")
    return Metrics(
        n_frames=len(found_tables),
        n_found=n_found,
        n_truth=n_truth,
        tp=tp,
        fp=fp,
        fn=fn,
        n_weak_matched=n_found - tp - fp,
        precision=float(precision),
        recall=float(recall),
        f1=float(f1),
        rmse_px=rmse,
        mean_dy=mean_dy,
        mean_dx=mean_dx,
    )


def _resolve_device(name: str) -> Any:
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def evaluate_main(args: Any) -> int:
    """``peaknet-pva evaluate``: score each backend on a simulated dataset; print JSON.

    ``args`` (an ``argparse.Namespace``; missing attributes take the defaults in brackets):
    ``data`` (a saved dataset folder or its truth.h5; else ``n_frames`` [20] frames of
    ``detector`` ["single"] are simulated with ``seed`` [1000]), ``backends``
    ["peaknet,peakfinder8"], ``weights`` ["default"] and ``device`` ["auto"] (``peaknet``),
    ``png`` (overlay of the first non-blank frame with the first backend's peaks), ``json``
    (write the result there too). peakfinder8 runs with ``tuned_params(detector)``, the preset's
    radius map and the dataset's bad-pixel mask. Returns 0, or 1 if a backend failed (its error
    is in the JSON).
    """
    from .simulate import DETECTORS, load_dataset, simulate_dataset

    data = getattr(args, "data", None)
    if data:
        ds = load_dataset(data)
    else:
        ds = simulate_dataset(
            int(getattr(args, "n_frames", 20)),
            detector=getattr(args, "detector", "single"),
            seed=int(getattr(args, "seed", 1000)),
            progress=bool(getattr(args, "progress", True)),
        )
    device = _resolve_device(getattr(args, "device", "auto"))
    frames = np.asarray(ds.frames)
    result: dict[str, Any] = {
        "dataset": {
            "source": str(data) if data else "simulated",
            "detector": ds.detector,
            "seed": ds.seed,
            "n_frames": ds.n_frames,
            "frame_shape": list(frames.shape[1:]),
            "n_detectable": int(sum(int(t.detectable.sum()) for t in ds.truths)),
        },
        "device": str(device),
        "backends": {},
    }
    found_first = None
    rc = 0
    names = [b.strip() for b in str(getattr(args, "backends", "peaknet,peakfinder8")).split(",") if b.strip()]
    from tqdm.auto import tqdm

    # Progress in frames over all backends (a single-backend run shows one too).
    bar = tqdm(total=len(names) * len(frames), desc="evaluate", unit="frame",
               disable=not getattr(args, "progress", True))
    for name in names:
        bar.set_postfix_str(name)
        try:
            t0 = time.perf_counter()
            if name == "peakfinder8":
                from .peakfinder8 import TUNED_PARAMS, Peakfinder8, Peakfinder8Params

                det = DETECTORS.get(ds.detector)
                radius = det.radius_map() if det is not None and det.frame_shape == frames.shape[1:] else None
                params = TUNED_PARAMS.get(ds.detector, Peakfinder8Params())
                finder = Peakfinder8(params, radius=radius, mask=~ds.bad_pixel_mask, device=device)
                finder.find_peaks(frames[:1])  # warm-up (tables, allocator)
                t0 = time.perf_counter()
                found = []
                for start in range(0, len(frames), 4):
                    found.extend(finder.find_peaks(frames[start : start + 4]))
                    bar.update(len(frames[start : start + 4]))
            elif name.split(":")[0] == "peaknet":
                from .finder import PeakFinder

                centroid = name.split(":", 1)[1] if ":" in name else "auto"
                finder = PeakFinder(
                    weights=getattr(args, "weights", "default"), device=str(device), panel_shape=ds.panel_shape,
                    centroid=centroid,
                )
                finder.warmup(frames.shape[1:], frames.dtype)
                t0 = time.perf_counter()
                found = []
                for start in range(0, len(frames), 4):
                    found.extend(finder.find(frames[start : start + 4]))
                    bar.update(len(frames[start : start + 4]))
            else:
                raise ValueError(f"unknown backend {name!r} (peaknet, peaknet:CENTROID, peakfinder8)")
            elapsed = time.perf_counter() - t0
            metrics = evaluate(found, ds.truths).as_dict()
            metrics["seconds_per_frame"] = elapsed / max(len(frames), 1)
            result["backends"][name] = metrics
            if found_first is None:
                found_first = (name, found)
        except Exception as exc:  # report per backend, keep scoring the others
            result["backends"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            rc = 1
    bar.close()
    png = getattr(args, "png", None)
    if png and found_first is not None:
        from .plotting import plot_frame_peaks

        index = next((i for i, t in enumerate(ds.truths) if not t.blank), 0)
        name, found = found_first
        plot_frame_peaks(frames[index], found[index], ds.truths[index], path=png,
                         title=f"{ds.detector} frame {index}: {name}")
        result["png"] = str(png)
    text = json.dumps(result, indent=2)
    out = getattr(args, "json", None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)
    return rc
