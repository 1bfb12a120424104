"""Pictures a clinician would look at: the predicted segmentation over the MRI, beside the reference.

For the first few cases of a segmentation evaluation (``overlay_cases``, default :data:`OVERLAY_CASES`),
:func:`shaspec_tf.evaluation.evaluate_subsets` keeps a few axial slices through the reference tumour's centre of
mass (:data:`OVERLAY_SLICES` of them): the MRI of one modality (the task's first, FLAIR for BraTS), the reference
label map, and the label map every subset predicted there. Nothing is predicted again: the slices are cut from the
predictions the evaluation scores, chosen before the first prediction (the reference alone decides them), and kept
for every subset because the worst subsets are known only at the end. :func:`write_overlays` then draws one PNG per
case with nilearn's ``plot_roi``: one row for the reference, one for the full modality set, one for each of the
:data:`WORST_SUBSETS` subsets with the lowest mean Dice over the evaluation, each row titled with that case's Dice
per region. Regions are painted largest first (BraTS: WT, then TC, then ET over it), so the colours read as the
usual oedema / core / enhancing picture.

Axes: arrays are ``[D, H, W]`` with ``D`` the NIfTI ``k`` axis (axial for BraTS), as :mod:`shaspec_tf.data.brats`
writes them. A case's ``"affine"`` (the NIfTI affine of its ``(i, j, k)`` grid), when it has one, orients the
slices as a viewer would; without one the voxels are shown on their ``"spacing"`` (1 mm if none).

Classification tasks, 2-D tasks and cases without an ``"image"`` keep nothing and get no picture. nilearn comes with
the ``pipeline`` extra: without it the pictures are left out with a one-line note, the other reports are written.
Figures are drawn on Matplotlib's non-interactive Agg canvas (no window) and written through
:func:`shaspec_tf.fileio.atomic_path`, so the report folder may be a ``gs://`` URI.
"""
from __future__ import annotations

import contextlib
import gc
import re
import sys
import warnings
from typing import Mapping, Sequence

import numpy as np

from shaspec_tf import fileio
from shaspec_tf.figures import save_figure

OVERLAY_CASES = 3             # cases pictured per evaluation (the first ones)
OVERLAY_SLICES = 3            # axial slices per case
WORST_SUBSETS = 2             # rows for the subsets of lowest mean Dice
OVERLAY_FOLDER = "overlays"   # inside a report folder
OVERLAY_KEY = "overlay_slices"  # results key of the kept slices (arrays: never written to the JSON reports)
REGION_COLOURS = ("#31a354", "#e6550d", "#ffe119", "#3182bd", "#9467bd", "#e377c2", "#17becf", "#8c564b")


def axial_slices(labels: np.ndarray, count: int = OVERLAY_SLICES) -> list:
    """Up to ``count`` indices along axis 0: the tumour's centre of mass and slices a quarter of its extent either
    side (the middle of the volume when the reference is empty)."""
    depth = labels.shape[0]
    tumour = np.flatnonzero(np.asarray(labels).reshape(depth, -1).any(axis=1))
    if tumour.size == 0:
        centre, step = depth // 2, max(1, depth // 8)
    else:
        weights = np.count_nonzero(np.asarray(labels).reshape(depth, -1), axis=1)
        centre = int(round(float(np.average(np.arange(depth), weights=weights))))
        step = max(1, (int(tumour[-1]) - int(tumour[0]) + 1) // 4)
    offsets = sorted(range(-(count // 2), count - count // 2), key=abs)[:count]
    return sorted({int(np.clip(centre + o * step, 0, depth - 1)) for o in offsets})


class OverlayKeeper:
    """What :func:`~shaspec_tf.evaluation.evaluate_subsets` keeps for the pictures: call :meth:`start` for each case
    before its predictions, :meth:`keep` with each prediction, and :meth:`result` at the end."""

    def __init__(self, n_cases: int, kind: str, modalities: Sequence[str], regions: Mapping):
        if int(n_cases) < 0:
            raise ValueError(f"overlay_cases must be 0 or more, got {n_cases}")
        self.n_cases = int(n_cases) if kind == "segmentation" else 0
        self.modalities = list(modalities)
        self.regions = {name: [int(v) for v in values] for name, values in regions.items()}
        self.cases: list = []
        self.current = None

    def start(self, index: int, case_id: str, case, spacing=None) -> None:
        self.current = None
        if index >= self.n_cases or not isinstance(case, Mapping) or case.get("image") is None \
                or case.get("labels") is None:
            return
        image, labels = np.asarray(case["image"]), np.asarray(case["labels"])
        if labels.ndim != 3 or image.ndim != 4 or image.shape[:3] != labels.shape:
            return
        slices = axial_slices(labels)
        affine, spacing = case.get("affine"), case.get("spacing", spacing)
        spacing = (1.0, 1.0, 1.0) if spacing is None else np.broadcast_to(np.asarray(spacing, float), (3,))
        self.current = {"case_id": case_id, "slices": slices, "spacing": [float(s) for s in spacing],
                        "affine": None if affine is None else np.asarray(affine, dtype=float).tolist(),
                        "image": image[slices, :, :, 0].astype(np.float32), "reference": labels[slices].copy(),
                        "predictions": {}}
        self.cases.append(self.current)

    def keep(self, subset: str, prediction) -> None:
        if self.current is not None:
            self.current["predictions"][subset] = np.asarray(prediction)[self.current["slices"]].copy()

    def result(self):
        """``None`` when nothing was kept, else ``{"modality", "regions", "cases": [...]}``."""
        self.current = None
        if not self.cases:
            return None
        return {"modality": self.modalities[0], "regions": self.regions, "cases": self.cases}


# ---------------------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------------------

def overlay_rows(results) -> list:
    """``[(row title, subset), ...]`` after the reference row: the full modality set, then the
    :data:`WORST_SUBSETS` subsets of lowest mean Dice (the task's blessing score per subset), worst first."""
    from shaspec_tf.taskspec.registry import get_task

    scoring = get_task(results["task"]).scoring
    subsets = list(results["subsets"])
    full = "+".join(results["modalities"])
    rows = [("full set", full)] if full in subsets else []
    scores = {name: scoring.subset_score(results["summary"][name], results["columns"]) for name in subsets}
    worst = sorted((name for name in subsets if name != full), key=lambda name: (scores[name], subsets.index(name)))
    return rows + [(f"worst subset {rank}", name) for rank, name in enumerate(worst[:WORST_SUBSETS], 1)]


def _file_name(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", case_id).strip("._") or "case"


def _painted(labels: np.ndarray, regions: Mapping) -> np.ndarray:
    """Region index per voxel (0 = none), regions painted largest label set first."""
    out = np.zeros(labels.shape, dtype=np.float32)
    for index, name in enumerate(_paint_order(regions), 1):
        out[np.isin(labels, regions[name])] = index
    return out


def _paint_order(regions: Mapping) -> list:
    return sorted(regions, key=lambda name: -len(regions[name]))


def _display_affine(case) -> np.ndarray:
    """The in-plane part of the case's affine (or of its spacing), one unit per kept slice along z."""
    spacing = case["spacing"]
    affine = np.diag([float(spacing[2]), float(spacing[1]), 1.0, 1.0])
    if case.get("affine") is not None:
        full = np.asarray(case["affine"], dtype=float)
        plane = full[:2, :2]
        if np.linalg.matrix_rank(plane) == 2 and np.abs(full[2, :2]).max() <= 1e-3 * np.abs(plane).max():
            affine[:2, :2] = plane
    return affine


def _volume(slices: np.ndarray, affine: np.ndarray):
    import nibabel as nib

    return nib.Nifti1Image(np.ascontiguousarray(np.asarray(slices).transpose(2, 1, 0)), affine)


def _case_dice(results, subset: str, case_id: str) -> str:
    scores = results["per_case"].get(subset, {}).get(case_id)
    if not scores:
        return ""
    return " · ".join(f"{region} {100.0 * scores[region]['dice']:.1f}" for region in results["columns"]
                      if region in scores) + " (Dice %)"


def draw_case(results, case: Mapping, rows: list, data: Mapping):
    """The Matplotlib figure of one kept case: the reference row, then ``rows`` (``(title, subset)``)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from nilearn import plotting

    regions = data["regions"]
    order = _paint_order(regions)
    colours = [REGION_COLOURS[i % len(REGION_COLOURS)] for i in range(len(order))]
    cmap = ListedColormap(colours)
    affine = _display_affine(case)
    background = _volume(case["image"], affine)
    lines = [("reference", case["reference"], "")]
    lines += [(f"{title}: {subset}", case["predictions"][subset], _case_dice(results, subset, case["case_id"]))
              for title, subset in rows if subset in case["predictions"]]
    n_slices = len(case["slices"])
    fig = Figure(figsize=(2.6 * n_slices + 0.4, 2.7 * len(lines) + 0.9), dpi=100, facecolor="black")
    axes = fig.subplots(len(lines), 1, squeeze=False)[:, 0]
    with _collections_set_aside():
        for ax, line in zip(axes, lines):
            _draw_row(plotting, ax, line, background, affine, cmap, len(order), regions)
            gc.freeze()  # what this row made is left out of the next row's collections too
    slices = ", ".join(str(k) for k in case["slices"])
    fig.suptitle(f"{case['case_id']}: {data['modality']}, axial slices {slices}", color="white", fontsize=11)
    fig.legend(handles=[Patch(facecolor=c, label=name) for c, name in zip(colours, order)], loc="lower center",
               ncol=len(order), frameon=False, labelcolor="white", fontsize=9)
    return fig


def _draw_row(plotting, ax, line, background, affine, cmap, n_regions: int, regions) -> None:
    """One row: the kept slices side by side, ``line``'s label map (``(title, labels [S, H, W], Dice text)``)
    painted over the MRI."""
    title, labels, dice_text = line
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="empty mask")  # an empty prediction is a result, not a fault
        display = plotting.plot_roi(_volume(_painted(labels, regions), affine), bg_img=background, axes=ax,
                                    display_mode="z", cut_coords=[float(k) for k in range(labels.shape[0])],
                                    cmap=cmap, vmin=0.5, vmax=n_regions + 0.5, alpha=0.55, annotate=False,
                                    draw_cross=False, black_bg=True, colorbar=False, dim=0,
                                    resampling_interpolation="nearest")
        # nilearn frames each row on what it shows (the brain, or a prediction spilling past it): an invisible
        # layer over the whole grid gives every row the same field of view
        display.add_overlay(_volume(np.ones(labels.shape, np.float32), affine), cmap=cmap, alpha=0.0)
    display.title(title + (f"   {dice_text}" if dice_text else ""), size=9, color="white", bgcolor="black")


@contextlib.contextmanager
def _collections_set_aside():
    """nilearn forces a full garbage collection on every image it reads (a dozen per row); in a process holding
    TensorFlow and a model each costs a good part of a second. Frozen objects are left out of collections
    (``gc.freeze``), so the heap is set aside while drawing and handed back after (unless someone else had frozen
    objects before: theirs stay as they were)."""
    ours = gc.get_freeze_count() == 0
    gc.freeze()
    try:
        yield
    finally:
        if ours:
            gc.unfreeze()


def write_overlays(results, out_dir: str) -> dict:
    """One PNG per kept case under ``out_dir/overlays`` (case id -> path); ``{}`` when the results kept none or
    nilearn is missing (said in one line on stderr)."""
    data = results.get(OVERLAY_KEY)
    if not data or not data.get("cases"):
        return {}
    try:
        import nilearn.plotting  # noqa: F401
    except ImportError:
        print("segmentation overlays left out: they need nilearn==0.10.4 (pip install 'shaspec-tf[pipeline]')",
              file=sys.stderr, flush=True)
        return {}
    rows = overlay_rows(results)
    folder = fileio.join(out_dir, OVERLAY_FOLDER)
    fileio.makedirs(folder)
    paths, used = {}, set()
    for case in data["cases"]:
        name = _file_name(case["case_id"])
        while name in used:
            name += "_"
        used.add(name)
        path = fileio.join(folder, f"{name}.png")
        save_figure(draw_case(results, case, rows, data), path, facecolor="black")
        paths[case["case_id"]] = path
    return paths


def markdown_section(results, relative_paths: Mapping[str, str]) -> str:
    """The report's "Segmentation overlays" section listing the pictures (paths relative to the report)."""
    if not relative_paths:
        return ""
    data = results[OVERLAY_KEY]
    described = ", ".join(f"{title} ({subset})" for title, subset in overlay_rows(results))
    lines = ["", "## Segmentation overlays", "",
             f"The first {len(relative_paths)} cases, on {data['modality']}: rows are the reference, then the "
             f"predictions of {described}; each row gives that case's Dice per region. Regions are painted "
             f"{', then '.join(_paint_order(data['regions']))} over it.", ""]
    lines += [f"- **{case_id}**: [{path}]({path})" for case_id, path in relative_paths.items()]
    lines += [""] + [f"![{case_id}]({path})" for case_id, path in relative_paths.items()]
    return "\n".join(lines) + "\n"
