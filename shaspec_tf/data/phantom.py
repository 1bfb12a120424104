"""Realistic synthetic BraTS phantoms: MNI152 anatomy, four MRI contrasts, a glioma with BraTS labels, written as
BraTS-layout NIfTI cases.

Where :mod:`shaspec_tf.data.toy` draws an ellipsoid in NumPy, this generator starts from the real MNI152 2009 templates
that ship inside ``nilearn`` 0.10.4 (offline: the T1 template, the grey- and white-matter probability maps and the
brain mask) and, per case:

1. **Anatomy.** The templates are cropped to the brain, anti-aliased and resampled (``scipy.ndimage.zoom``, order 1)
   into the BraTS field of view (155 x 240 x 240 mm, D x H x W) at the requested shape; CSF is the brain mask minus
   GM minus WM (clipped). This part is cached per shape. Each case then gets a random similarity transform (scale
   0.88-1.0, rotation of a few degrees, shift of a few mm), a small smooth elastic deformation (2-4 mm) and the mass
   effect of its tumour (tissue pushed away from the tumour centre, sulci effaced), all in one resampling pass.
2. **Tumour.** A core made of a few random anisotropic Gaussian blobs, lobulated by a smooth random field and
   thresholded to a random volume (equivalent radius 10-25 mm), centred in deep white matter; a necrotic centre
   (label 1) that lies deeper than a rim of random, spatially varying thickness (enhancing tumour, label 4);
   peritumoural oedema (label 2) around the core, 0.6-3 times the core volume, irregular and spreading through white
   matter rather than cortex or CSF. Labels are clipped to the brain mask.
3. **Contrasts.** Per-tissue intensity tables (jittered per case) for FLAIR, T1, T1ce and T2 (T1: WM > GM > CSF; T2:
   CSF > GM > WM; FLAIR: CSF suppressed, GM > WM; T1 and T1ce are blended with the real T1 template), with the
   tumour sub-regions complementary across sequences as in real MRI: the enhancing rim is bright in T1ce only,
   oedema is bright in FLAIR and T2, necrosis is dark in T1 and T1ce (and fluid-bright in T2). T1ce also shows
   enhancing pial vessels in the sulci. Tumour boundaries get a half-voxel partial-volume blur and a texture.
4. **Scanner.** A smooth multiplicative bias field per sequence, Rician noise, and a random global scale per
   sequence; values are rounded to integers (in the hundreds to low thousands, int16-safe), every brain voxel is
   >= 1 and the background is exactly 0.

Arrays are ``[D, H, W]`` (see :mod:`shaspec_tf.data.schema`): the NIfTI files hold ``array.transpose(2, 1, 0)``, with
a diagonal RAS affine of spacing 155/D, 240/H, 240/W mm along D, H, W (1 mm at the full BraTS size
``shape=(155, 240, 240)``) and the origin at the centre of the volume.

Everything is deterministic per seed (independent random streams for geometry, tumour, contrast table and each
sequence, so dropping a sequence leaves the others unchanged). :func:`write_phantom_dataset` writes case ``k`` of a
dataset from the seed ``phantom_case_seed(seed, k)``, so case ``k`` is the same whatever the number of cases.

Needs ``nilearn==0.10.4`` and ``scipy`` (the ``pipeline`` extra); imported lazily.
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple, Union

import numpy as np

from .schema import BRATS_MODALITIES

PHANTOM_VERSION = 1
#: The ownership marker's kind (:mod:`shaspec_tf.fileio`) of a :func:`write_phantom_dataset` folder.
KIND = "phantom-nifti"
MANIFEST = "phantoms.json"
DEFAULT_SHAPE = (48, 64, 64)          # D, H, W: 3.2 x 3.75 x 3.75 mm voxels, a few tenths of a second per case
BRATS_SHAPE = (155, 240, 240)         # D, H, W of a real BraTS volume (NIfTI 240 x 240 x 155 at 1 mm)
FOV_MM = (155.0, 240.0, 240.0)        # the BraTS field of view, D, H, W
LABELS = {"necrosis": 1, "oedema": 2, "enhancing": 4}
SEG_SUFFIX = "seg"

# Relative intensities (normal white matter in T1 = 1) per sequence for the tissues
#                 csf   gm    wm    necrosis oedema enhancing
_TISSUES = ("csf", "gm", "wm", "necrosis", "oedema", "enhancing")
_CONTRAST = {
    "flair": (0.10, 0.80, 0.58, 0.50, 1.35, 0.78),
    "t1":    (0.25, 0.65, 1.00, 0.32, 0.68, 0.72),
    "t1ce":  (0.25, 0.65, 1.00, 0.35, 0.72, 1.90),
    "t2":    (1.00, 0.55, 0.40, 0.95, 0.85, 0.60),
}
_T1_TEMPLATE_BLEND = 0.4   # weight of the real MNI T1 template in the T1 and T1ce images
_VESSEL_T1CE = 0.9         # enhancing vessels (pial veins) in T1ce, on top of the sulcal CSF

# Seed streams of one case (np.random.default_rng([seed, stream])).
_GEOMETRY, _TUMOUR, _TABLE, _DROP = 0, 1, 2, 3
_MODALITY_STREAM = 10


# ---------------------------------------------------------------------------------------------------------------------
# Geometry helpers


def phantom_spacing(shape: Sequence[int]) -> np.ndarray:
    """Voxel size in mm along D, H, W for a phantom of ``shape`` (the BraTS field of view over the shape)."""
    return np.asarray(FOV_MM, dtype=np.float64) / np.asarray(shape, dtype=np.float64)


def phantom_affine(shape: Sequence[int]) -> np.ndarray:
    """The NIfTI affine (voxel axes ``i, j, k`` = W, H, D) of a phantom: diagonal RAS, centred on the origin."""
    sp = phantom_spacing(shape)[::-1]                      # i, j, k
    n = np.asarray(shape, dtype=np.float64)[::-1]
    affine = np.diag([sp[0], sp[1], sp[2], 1.0])
    affine[:3, 3] = -(n - 1.0) / 2.0 * sp
    return affine


def phantom_case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` of a dataset written with ``seed`` (independent of the number of cases)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def _rng(seed: int, stream: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(stream), *map(int, more)])


def _check_shape(shape) -> Tuple[int, int, int]:
    shape = DEFAULT_SHAPE if shape is None else tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"phantom shape must be three sizes >= 16 (D, H, W), got {shape}")
    return shape


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], cell: Sequence[float]) -> np.ndarray:
    """A smooth random field of unit variance over ``shape``: Gaussian radial basis functions on a grid of knots
    ``cell`` voxels apart with standard-normal weights, evaluated separably (three small matrix products)."""
    coarse, bases = [], []
    for n, c in zip(shape, cell):
        c = max(float(c), 1.0)
        knots = np.arange(-c, n - 1 + 2 * c, c)
        x = np.arange(n, dtype=np.float64)[:, None]
        basis = np.exp(-0.5 * ((x - knots[None, :]) / c) ** 2)
        basis /= np.sqrt(np.sum(basis ** 2, axis=1, keepdims=True))
        coarse.append(len(knots))
        bases.append(basis.astype(np.float32))
    weights = rng.standard_normal(coarse).astype(np.float32)
    field = np.tensordot(weights, bases[2], axes=([2], [1]))                         # c0, c1, n2
    field = np.einsum("abk,jb->ajk", field, bases[1], optimize=True)                 # c0, n1, n2
    field = np.tensordot(bases[0], field, axes=([1], [0]))                           # n0, n1, n2
    return np.ascontiguousarray(field, dtype=np.float32)


def _rotation(angles: np.ndarray) -> np.ndarray:
    out = np.eye(3)
    for axis, angle in enumerate(angles):
        a, b = [i for i in range(3) if i != axis]
        r = np.eye(3)
        r[a, a] = r[b, b] = np.cos(angle)
        r[a, b], r[b, a] = -np.sin(angle), np.sin(angle)
        out = out @ r
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Anatomy (cached)


@functools.lru_cache(maxsize=1)
def _mni_templates():
    """MNI152 T1 template, GM and WM probability maps and brain mask from nilearn (offline), as float32 ``[D, H, W]``
    arrays cropped to the brain (1 mm voxels)."""
    try:
        from nilearn import datasets
    except ImportError as err:  # pragma: no cover - exercised only without the pipeline extra
        raise ImportError("phantoms need nilearn==0.10.4 and scipy (pip install 'shaspec-tf[pipeline]')") from err

    def dhw(img):
        return np.asarray(img.get_fdata(dtype=np.float32)).transpose(2, 1, 0)

    t1 = dhw(datasets.load_mni152_template(resolution=1))
    gm = dhw(datasets.load_mni152_gm_template(resolution=1))
    wm = dhw(datasets.load_mni152_wm_template(resolution=1))
    mask = dhw(datasets.load_mni152_brain_mask(resolution=1))
    idx = np.argwhere(mask > 0)
    lo = np.maximum(idx.min(0) - 2, 0)
    hi = np.minimum(idx.max(0) + 3, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    return tuple(np.ascontiguousarray(a[box]) for a in (t1, gm, wm, mask))


@functools.lru_cache(maxsize=4)
def _anatomy(shape: Tuple[int, int, int]) -> dict:
    """The templates resampled into the BraTS field of view at ``shape`` (brain centred, fitted with a margin), plus
    what the cases need: bounding box, brain centre, a coarse distance-to-surface map for placing tumours."""
    from scipy import ndimage as ndi

    sp = phantom_spacing(shape)
    templates = _mni_templates()
    extent = np.asarray(templates[0].shape, dtype=np.float64)          # mm (1 mm templates)
    fit = min(1.0, float(np.min(0.95 * np.asarray(FOV_MM) / extent)))
    inner = np.minimum(np.maximum(np.round(extent * fit / sp), 8), shape).astype(int)
    zoom = inner / extent
    sigma = np.where(zoom < 0.8, (1.0 / zoom - 1.0) / 2.0, 0.0)        # anti-aliasing before downsampling
    offset = (np.asarray(shape) - inner) // 2
    place = tuple(slice(o, o + n) for o, n in zip(offset, inner))
    maps = {}
    for name, data in zip(("t1", "gm", "wm", "mask"), templates):
        if np.any(sigma > 0):
            data = ndi.gaussian_filter(data, sigma)
        small = ndi.zoom(data, zoom, order=1, output=np.float32)
        small = small[tuple(slice(0, n) for n in inner)]
        if small.shape != tuple(inner):                                # zoom rounding, should not happen
            small = np.pad(small, [(0, n - s) for n, s in zip(inner, small.shape)], mode="edge")
        full = np.zeros(shape, np.float32)
        full[place] = np.clip(small, 0.0, None)
        maps[name] = full
    brain = maps["mask"] > 0.5
    idx = np.argwhere(maps["mask"] > 1e-3)
    wm_ref = maps["t1"][brain & (maps["wm"] > 0.9)]
    stride = max(1, int(round(3.0 / sp.min())))
    coarse = brain[::stride, ::stride, ::stride]
    depth = ndi.distance_transform_edt(coarse, sampling=sp * stride).astype(np.float32)
    return dict(
        spacing=sp, maps=maps, lo=idx.min(0), hi=idx.max(0) + 1,
        centre_mm=np.argwhere(brain).mean(0) * sp,
        t1_wm=float(np.median(wm_ref)) if wm_ref.size else 0.86,
        stride=stride, depth=depth, wm_coarse=maps["wm"][::stride, ::stride, ::stride].copy(),
    )


# ---------------------------------------------------------------------------------------------------------------------
# One case


def _tumour_params(rng: np.random.Generator, anat: dict) -> dict:
    sp = anat["spacing"]
    big = float(sp.max())
    core = max(rng.uniform(10.0, 25.0), 3.5 * big)                      # equivalent radius of the core (mm)
    spread = max(rng.uniform(6.0, 30.0), 2.0 * big)                     # how far the oedema reaches (mm)
    ratio = rng.uniform(1.6, 4.0)                                       # whole tumour / core volume
    rim = float(np.clip(rng.uniform(0.2, 0.45) * core, 2.0, 9.0))        # enhancing rim thickness (mm)
    depth, wm, stride = anat["depth"], anat["wm_coarse"], anat["stride"]
    for need, wm_min in ((core + 4.0, 0.6), (core, 0.4), (0.5 * core, 0.0), (0.0, -1.0), (-1.0, -1.0)):
        candidates = np.argwhere((depth > need) & (wm > wm_min))
        if len(candidates):
            break
    pick = candidates[rng.integers(len(candidates))]
    centre = (pick * stride + rng.uniform(0, stride, 3)) * sp           # mm, in the undeformed anatomy
    room = float(depth[tuple(pick)])
    push_radius = float(min(2.0 * core + 0.5 * spread, max(0.9 * room, core)))
    return dict(core=core, spread=spread, ratio=ratio, rim=rim, centre_src=centre, push=rng.uniform(0.15, 0.4),
                push_radius=push_radius, blobs=int(rng.integers(2, 6)), seed=int(rng.integers(2 ** 31)))


def _deformed_anatomy(anat: dict, rng: np.random.Generator, tumour: dict):
    """Resample the cached anatomy through a random similarity transform, a smooth elastic field and the tumour's
    mass effect (backward mapping, one pass). Returns the work box (slices), the maps in it and the tumour centre in
    box voxels."""
    from scipy import ndimage as ndi

    sp = anat["spacing"]
    shape = anat["maps"]["mask"].shape
    margin = np.ceil(14.0 / sp).astype(int) + 2
    lo = np.maximum(anat["lo"] - margin, 0)
    hi = np.minimum(anat["hi"] + margin, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    box_shape = tuple(int(b - a) for a, b in zip(lo, hi))

    scale = rng.uniform(0.88, 1.0)
    rot = _rotation(np.clip(rng.normal(0.0, np.deg2rad(3.0), 3), -np.deg2rad(7), np.deg2rad(7)))
    shift = np.clip(rng.normal(0.0, 3.0, 3), -8.0, 8.0)
    centre = anat["centre_mm"]
    a = rot.T / scale                                                   # output mm -> source mm
    b = centre - a @ (centre + shift)
    amplitude = rng.uniform(2.0, 4.0)
    cell = 30.0 / sp
    elastic = [amplitude * _smooth_field(rng, box_shape, cell) for _ in range(3)]

    # Tumour centre in output space (the inverse of the affine part; the elastic part moves it by a few mm only).
    c_out = np.linalg.solve(a, tumour["centre_src"] - b)
    grids = [np.arange(l, h, dtype=np.float64) * s for l, h, s in zip(lo, hi, sp)]
    axes = [tuple(slice(None) if j == k else None for j in range(3)) for k in range(3)]
    coords = np.empty((3,) + box_shape, dtype=np.float64)
    for i in range(3):
        out = coords[i]
        out[...] = (a[i, 0] * grids[0] + b[i])[axes[0]]
        out += (a[i, 1] * grids[1])[axes[1]]
        out += (a[i, 2] * grids[2])[axes[2]]
        out += elastic[i]
    del elastic
    # Mass effect, inside a ball around the tumour: q = c + (p - c) * gain(|p - c|) with a monotone radial gain < 1
    # (tissue pushed outwards), i.e. the source moves by a @ (q - p).
    radius = tumour["push_radius"]
    c_vox = c_out / sp - lo
    p_lo = np.clip(np.floor(c_vox - radius / sp).astype(int), 0, box_shape)
    p_hi = np.clip(np.ceil(c_vox + radius / sp).astype(int) + 1, 0, box_shape)
    if np.all(p_hi > p_lo):
        sub = tuple(slice(l, h) for l, h in zip(p_lo, p_hi))
        rel = [grids[k][sub[k]] - c_out[k] for k in range(3)]
        s = (rel[0][axes[0]] ** 2 + rel[1][axes[1]] ** 2 + rel[2][axes[2]] ** 2) / radius ** 2
        shrink = -tumour["push"] * np.clip(1.0 - s, 0.0, None) ** 2        # gain - 1
        for i in range(3):
            coords[i][sub] += sum((a[i, k] * rel[k])[axes[k]] * shrink for k in range(3))
        del s, shrink
    coords /= sp[:, None, None, None]

    maps = anat["maps"]
    mask = ndi.map_coordinates(maps["mask"], coords, order=1, mode="constant", cval=0.0, output=np.float32)
    inside = mask > 1e-3
    points = coords[:, inside]
    out = {"mask": mask}
    for name in ("t1", "gm", "wm"):
        values = np.zeros(box_shape, np.float32)
        values[inside] = ndi.map_coordinates(maps[name], points, order=1, mode="constant", cval=0.0,
                                             output=np.float32)
        out[name] = values
    centre_vox = np.round(c_vox).astype(int)
    return box, out, np.clip(centre_vox, 0, np.asarray(box_shape) - 1)


def _top(score: np.ndarray, eligible: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` eligible voxels of highest score (ties included)."""
    values = score[eligible]
    count = int(min(max(count, 1), values.size))
    if count == 0:
        return np.zeros(score.shape, bool)
    threshold = np.partition(values, values.size - count)[values.size - count]
    return eligible & (score >= threshold)


def _tumour_labels(tumour: dict, centre: np.ndarray, sp: np.ndarray, brain, wm, csf):
    """BraTS labels of the tumour in a local box around ``centre`` (box voxels): returns (slices, labels), cropped
    to the tumour plus a 3-voxel margin.

    Core: a sum of anisotropic Gaussian blobs, lobulated by a smooth random field, thresholded to the drawn volume.
    Necrosis: the part of the core deeper than the (spatially varying) rim thickness; the rest of the core is the
    enhancing rim. Oedema: the drawn volume of highest score around the core, the score being the blob sum blurred by
    the spread (analytically: Gaussians stay Gaussians), times a smooth random field, weighted towards white matter
    and excluding CSF."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(tumour["seed"])
    core_r, spread = tumour["core"], tumour["spread"]
    half = np.ceil((2.2 * core_r + 1.5 * spread + 4.0) / sp).astype(int)
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, brain.shape)
    loc = tuple(slice(a, b) for a, b in zip(lo, hi))
    shape = tuple(int(b - a) for a, b in zip(lo, hi))
    rel = [(np.arange(l, h) - c) * s for l, h, c, s in zip(lo, hi, centre, sp)]

    core_field = np.zeros(shape, np.float32)
    oedema_field = np.zeros(shape, np.float32)
    for k in range(tumour["blobs"]):
        offset = np.zeros(3) if k == 0 else rng.normal(0.0, 0.5 * core_r, 3)
        radii = core_r * rng.uniform(0.45, 0.9, 3)
        amp = 1.0 if k == 0 else rng.uniform(0.5, 1.0)
        wide = np.sqrt(radii ** 2 + spread ** 2)
        g = [np.exp(-0.5 * ((x - o) / r) ** 2).astype(np.float32) for x, o, r in zip(rel, offset, radii)]
        h = [(r / w * np.exp(-0.5 * ((x - o) / w) ** 2)).astype(np.float32)
             for x, o, r, w in zip(rel, offset, radii, wide)]
        core_field += amp * g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
        oedema_field += amp * h[0][:, None, None] * h[1][None, :, None] * h[2][None, None, :]
    core_field *= np.exp(0.45 * _smooth_field(rng, shape, 8.0 / sp))          # lobulated outline
    b_loc = brain[loc]
    voxel = float(np.prod(sp))
    core = _top(core_field, b_loc, round(4.0 / 3.0 * np.pi * core_r ** 3 / voxel))

    labels = np.zeros(shape, np.uint8)
    if not core.any():                                                      # no brain here (degenerate shapes)
        return loc, labels
    labels[core] = LABELS["enhancing"]
    idx = np.argwhere(core)
    c_lo = np.maximum(idx.min(0) - 1, 0)
    c_hi = np.minimum(idx.max(0) + 2, shape)
    cb = tuple(slice(a, b) for a, b in zip(c_lo, c_hi))
    depth = ndi.distance_transform_edt(core[cb], sampling=sp)
    rim_field = _smooth_field(rng, depth.shape, 10.0 / sp)
    rim = np.maximum(tumour["rim"] * np.clip(1.0 + 0.45 * rim_field, 0.5, 2.0), 1.05 * sp.max())
    necrosis = (depth > rim) & core[cb]
    if not necrosis.any() and depth.max() > 1.05 * sp.max():               # keep a necrotic centre
        necrosis = depth >= depth.max()
    labels[cb][necrosis] = LABELS["necrosis"]

    score = oedema_field * np.exp(0.5 * _smooth_field(rng, shape, 12.0 / sp)) * (0.3 + wm[loc])
    eligible = b_loc & ~core & (csf[loc] < 0.7)
    oedema = _top(score, eligible, round(core.sum() * (tumour["ratio"] - 1.0)))
    parts, _ = ndi.label(oedema | core)                                     # drop islands away from the core
    oedema &= np.isin(parts, np.unique(parts[core]))
    labels[oedema] = LABELS["oedema"]

    idx = np.argwhere(labels > 0)
    t_lo = np.maximum(idx.min(0) - 3, 0)
    t_hi = np.minimum(idx.max(0) + 4, shape)
    labels = np.ascontiguousarray(labels[tuple(slice(a, b) for a, b in zip(t_lo, t_hi))])
    loc = tuple(slice(l.start + a, l.start + b) for l, a, b in zip(loc, t_lo, t_hi))
    return loc, labels


def make_phantom_case(seed: int, shape: Optional[Sequence[int]] = None, drop: Iterable[str] = (),
                      return_maps: bool = False):
    """One synthetic BraTS case.

    Returns ``(volumes, labels, affine)``: ``volumes`` maps each sequence of ``flair, t1, t1ce, t2`` not in ``drop``
    to a float32 ``[D, H, W]`` array (integer values, >= 1 in the brain, exactly 0 outside); ``labels`` is uint8
    ``[D, H, W]`` in ``{0, 1, 2, 4}`` (necrosis, oedema, enhancing); ``affine`` is the NIfTI affine (see
    :func:`phantom_affine`). With ``return_maps=True`` a fourth item holds the ground-truth anatomy: float32 tissue
    fractions ``gm``, ``wm``, ``csf`` and the bool ``brain`` mask, all ``[D, H, W]``. ``shape`` is D, H, W
    (default :data:`DEFAULT_SHAPE`; ``(155, 240, 240)`` for full BraTS size). Dropped sequences are not computed and
    do not change the others."""
    from scipy import ndimage as ndi

    shape = _check_shape(shape)
    drop = tuple(drop)
    unknown = sorted(set(drop) - set(BRATS_MODALITIES))
    if unknown:
        raise ValueError(f"unknown sequences to drop {unknown}: expected some of {list(BRATS_MODALITIES)}")
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    anat = _anatomy(shape)
    sp = anat["spacing"]

    tumour = _tumour_params(_rng(seed, _TUMOUR), anat)
    box, maps, centre = _deformed_anatomy(anat, _rng(seed, _GEOMETRY), tumour)
    brain = maps["mask"] > 0.5
    gm = np.clip(maps["gm"], 0.0, 1.0)
    wm = np.clip(maps["wm"], 0.0, 1.0)
    csf = np.clip(maps["mask"] - gm - wm, 0.0, 1.0)
    total = np.maximum(gm + wm + csf, 1e-3)
    gm, wm, csf = (np.where(brain, t / total, 0.0).astype(np.float32) for t in (gm, wm, csf))
    t1_template = np.where(brain, maps["t1"] / anat["t1_wm"], 0.0).astype(np.float32)
    del maps, total

    loc, tumour_labels = _tumour_labels(tumour, centre, sp, brain, wm, csf)
    labels_box = np.zeros(brain.shape, np.uint8)
    labels_box[loc] = tumour_labels * brain[loc]
    weights = {c: ndi.gaussian_filter((labels_box[loc] == LABELS[c]).astype(np.float32), 0.5)
               for c in ("necrosis", "oedema", "enhancing")}
    normal_weight = np.clip(1.0 - sum(weights.values()), 0.0, 1.0)

    jitter = np.exp(_rng(seed, _TABLE).normal(0.0, 0.05, (len(BRATS_MODALITIES), len(_TISSUES))))
    inside = np.nonzero(brain)
    volumes = {}
    for m, name in enumerate(BRATS_MODALITIES):
        if name in drop:
            continue
        rng = _rng(seed, _MODALITY_STREAM + m)
        table = dict(zip(_TISSUES, np.asarray(_CONTRAST[name]) * jitter[m]))
        image = csf * table["csf"] + gm * table["gm"] + wm * table["wm"]
        if name in ("t1", "t1ce"):
            image = (1.0 - _T1_TEMPLATE_BLEND) * image + _T1_TEMPLATE_BLEND * table["wm"] * t1_template
        if name == "t1ce":
            n1, n2 = (_smooth_field(rng, brain.shape, np.maximum(6.0 / sp, 1.5)) for _ in range(2))
            vessels = np.exp(-(n1 ** 2 + n2 ** 2) / (2 * 0.12 ** 2)) * np.clip(2.0 * csf, 0.0, 1.0)
            image = image + _VESSEL_T1CE * vessels
            del n1, n2, vessels
        texture = 1.0 + 0.08 * _smooth_field(rng, tumour_labels.shape, np.maximum(5.0 / sp, 1.0))
        patch = image[loc] * normal_weight
        for c, w in weights.items():
            patch = patch + w * (table[c] * texture)
        image[loc] = patch
        bias = np.exp(rng.uniform(0.05, 0.2) * _smooth_field(rng, brain.shape, 70.0 / sp))
        values = (image * bias)[inside]
        sigma = rng.uniform(0.015, 0.04)
        real = values + sigma * rng.standard_normal(values.size, dtype=np.float32)
        imag = sigma * rng.standard_normal(values.size, dtype=np.float32)
        values = np.sqrt(real ** 2 + imag ** 2) * rng.uniform(250.0, 900.0)
        out = np.zeros(shape, np.float32)
        out[box][inside] = np.clip(np.rint(values), 1.0, 32767.0)
        volumes[name] = out

    labels = np.zeros(shape, np.uint8)
    labels[box] = labels_box
    result = (volumes, labels, phantom_affine(shape))
    if return_maps:
        full = {}
        for key, value in (("gm", gm), ("wm", wm), ("csf", csf), ("brain", brain)):
            arr = np.zeros(shape, value.dtype)
            arr[box] = value
            full[key] = arr
        result = result + (full,)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Datasets on disk


def _drops(seed: int, index: int, drop_rate: float):
    """Which sequences case ``index`` lacks: each independently with probability ``drop_rate``, but never all."""
    rng = _rng(seed, _DROP, index)
    draws = rng.random(len(BRATS_MODALITIES))
    keep = int(rng.integers(len(BRATS_MODALITIES)))
    dropped = [m for m, u in zip(BRATS_MODALITIES, draws) if u < drop_rate]
    if len(dropped) == len(BRATS_MODALITIES):
        dropped.remove(BRATS_MODALITIES[keep])
    return dropped


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path, dtype) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array.transpose(2, 1, 0), dtype=dtype), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _write_json(path: Path, payload: dict) -> None:
    from shaspec_tf import fileio

    fileio.atomic_write(str(path), json.dumps(payload, indent=1))


def legacy_output(folder) -> bool:
    """Whether ``folder`` (no ownership marker) is a phantom data set written before markers existed: a
    ``phantoms.json`` of this generator, and nothing else than case folders ``<prefix>_NNNN`` (its prefix) holding
    only that case's ``.nii.gz`` sequences and seg."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("generator") != "shaspec_tf.data.phantom" or \
            not isinstance(manifest.get("prefix"), str):
        return False
    case = re.compile(re.escape(manifest["prefix"]) + r"_\d{4,}")
    names = "|".join(BRATS_MODALITIES + (SEG_SUFFIX,))
    for entry in os.scandir(folder):
        if entry.name == MANIFEST and entry.is_file(follow_symlinks=False):
            continue
        if not (case.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)):
            return False
        own = re.compile(re.escape(entry.name) + f"_({names})\\.nii\\.gz")
        if not all(own.fullmatch(f.name) and f.is_file(follow_symlinks=False) for f in os.scandir(entry.path)):
            return False
    return True


def _clean_litter(folder: Path) -> None:
    """Remove the ``.NAME.partial-HOST-PID-*`` leftovers of dead runs in ``folder``, whatever ``NAME``
    (:func:`shaspec_tf.fileio.clean_stale` looks for one name at a time)."""
    from shaspec_tf import fileio

    if not folder.is_dir():
        return
    for name in {e[1:].split(".partial-", 1)[0] for e in os.listdir(folder)
                 if e.startswith(".") and ".partial-" in e}:
        fileio.clean_stale(str(folder / name))


def write_phantom_dataset(out_dir: Union[str, os.PathLike], cases: Union[int, Iterable[int]],
                          shape: Optional[Sequence[int]] = None, seed: int = 0, drop_rate: float = 0.0,
                          prefix: str = "Phantom", skip_existing: bool = False, progress: bool = True) -> dict:
    """Write phantom cases in the BraTS 2018-2021 layout: ``out_dir/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz``
    with ``<case> = f"{prefix}_{k:04d}"``; sequences are int16 (exact: the values are integers), the seg uint8.

    ``cases`` is a count (cases ``0 .. N-1``, N >= 1) or the case indices to write. Case ``k`` is generated from
    :func:`phantom_case_seed` ``(seed, k)``, so it is identical whatever the other cases. With ``drop_rate`` P each
    sequence file of a case is left out independently with probability P (an incomplete acquisition), keeping at
    least one (chosen uniformly when all four would go); the seg is always written. Each case is written into a
    hidden temporary folder (``.<case>.partial-HOST-PID-RANDOM``; those of killed runs are removed by later ones) and
    renamed into place, so an interrupted run never leaves a half case that looks whole; ``skip_existing=True``
    resumes such a run (keeps case folders already there). ``phantoms.json`` (rewritten atomically after every case)
    records the seed, shape, spacing, drop rate and, per case, its seed and the sequences present and dropped.
    Returns that manifest.

    ``out_dir`` must be absent, empty, or a phantom data set of ours: the ownership marker of
    :mod:`shaspec_tf.fileio` (kind ``"phantom-nifti"``, updated before each case lands) must list everything in it,
    or, for a data set from before markers, :func:`legacy_output` must vouch for it. Anything else is refused with a
    one-line ``FileExistsError`` before any file is written, so no case folder or ``phantoms.json`` of someone else
    is ever replaced."""
    from tqdm import tqdm

    from shaspec_tf import fileio

    if not 0.0 <= float(drop_rate) <= 1.0:
        raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate}")
    shape = _check_shape(shape if shape is not None else DEFAULT_SHAPE)
    if isinstance(cases, (int, np.integer)) and int(cases) < 1:
        raise ValueError(f"the number of cases must be >= 1, got {cases}")
    indices = list(range(int(cases))) if isinstance(cases, (int, np.integer)) else [int(k) for k in cases]
    if not indices or any(k < 0 for k in indices) or len(set(indices)) != len(indices):
        raise ValueError("case indices must be distinct, >= 0, and at least one")
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    out = Path(out_dir)
    # A killed run's partial case folders (ours by their name; their process is gone) go first: the ownership check
    # would count their files as foreign (fileio.list_files skips partial files, not the files in partial folders).
    _clean_litter(out)
    ours = fileio.ensure_replaceable(str(out), KIND, check_sizes=False, legacy=legacy_output)
    out.mkdir(parents=True, exist_ok=True)
    marker = fileio.read_marker(str(out)) if ours else None
    # What the marker lists: every file in the folder (checked ours above), kept a superset of what is there at any
    # moment, so that a run killed between two steps leaves a folder a later run still recognises.
    listed = dict(marker["files"]) if marker else fileio.list_files(str(out))
    listed.setdefault(MANIFEST, 0)              # rewritten after every case
    fileio.write_marker(str(out), KIND, files=listed)
    manifest = {
        "generator": "shaspec_tf.data.phantom", "version": PHANTOM_VERSION, "seed": int(seed),
        "shape": list(shape), "nifti_shape": list(shape[::-1]), "spacing_mm": phantom_spacing(shape).tolist(),
        "drop_rate": float(drop_rate), "prefix": prefix, "modalities": list(BRATS_MODALITIES),
        "num_cases": len(indices), "cases": [],
    }

    for k in tqdm(indices, desc="phantoms", unit="case", disable=not progress):
        case_id = f"{prefix}_{k:04d}"
        dropped = _drops(seed, k, float(drop_rate))
        entry = {"case_id": case_id, "index": k, "seed": phantom_case_seed(seed, k), "dropped": dropped,
                 "present": [m for m in BRATS_MODALITIES if m not in dropped]}
        final = out / case_id
        if not (skip_existing and final.is_dir()):
            volumes, labels, affine = make_phantom_case(entry["seed"], shape, drop=dropped)
            tmp = Path(fileio.staging_dir(str(final)))
            old = None
            try:
                for name, volume in volumes.items():
                    _save_nifti(volume, affine, tmp / f"{case_id}_{name}.nii.gz", np.int16)
                _save_nifti(labels, affine, tmp / f"{case_id}_{SEG_SUFFIX}.nii.gz", np.uint8)
                # listed before it lands
                listed.update({f"{case_id}/{name}": size for name, size in fileio.list_files(str(tmp)).items()})
                fileio.write_marker(str(out), KIND, files=listed)
                if final.exists():                                      # overwrite: swap, then delete the old one
                    old = Path(fileio.partial_name(str(final)))         # a dead run's leftover is cleaned later
                    os.rename(final, old)
                os.rename(tmp, final)
            except BaseException:
                fileio.remove_tree(str(tmp))
                if old is not None and not final.exists():
                    os.rename(old, final)
                raise
            if old is not None:
                fileio.remove_tree(str(old))
            entry["label_voxels"] = {str(v): int(np.sum(labels == v)) for v in LABELS.values()}
        manifest["cases"].append(entry)
        _write_json(out / MANIFEST, manifest)
    _write_json(out / MANIFEST, manifest)
    # The final listing: exactly what the folder holds (all of it ours: checked at the start, written since).
    fileio.write_marker(str(out), KIND, files={k: v for k, v in fileio.list_files(str(out)).items()
                                               if k in listed or k == MANIFEST})
    return manifest


__all__ = ["BRATS_SHAPE", "DEFAULT_SHAPE", "FOV_MM", "KIND", "LABELS", "legacy_output", "make_phantom_case",
           "phantom_affine", "phantom_case_seed", "phantom_spacing", "write_phantom_dataset"]
