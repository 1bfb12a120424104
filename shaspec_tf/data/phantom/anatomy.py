"""Phantom generation: MNI152 anatomy, contrasts, tumour and scanner effects of one case (see the package docstring)."""
from __future__ import annotations

import functools
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np

from ..schema import BRATS_MODALITIES

PHANTOM_VERSION = 1
#: The ownership marker's kind (:mod:`shaspec_tf.fileio`) of a :func:`write_phantom_dataset` folder.
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
_GEOMETRY, _TUMOUR, _TABLE, DROP_STREAM = 0, 1, 2, 3
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


def stream_rng(seed: int, stream: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(stream), *map(int, more)])


def check_shape(shape) -> Tuple[int, int, int]:
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

    shape = check_shape(shape)
    drop = tuple(drop)
    unknown = sorted(set(drop) - set(BRATS_MODALITIES))
    if unknown:
        raise ValueError(f"unknown sequences to drop {unknown}: expected some of {list(BRATS_MODALITIES)}")
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    anat = _anatomy(shape)
    sp = anat["spacing"]

    tumour = _tumour_params(stream_rng(seed, _TUMOUR), anat)
    box, maps, centre = _deformed_anatomy(anat, stream_rng(seed, _GEOMETRY), tumour)
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

    jitter = np.exp(stream_rng(seed, _TABLE).normal(0.0, 0.05, (len(BRATS_MODALITIES), len(_TISSUES))))
    inside = np.nonzero(brain)
    volumes = {}
    for m, name in enumerate(BRATS_MODALITIES):
        if name in drop:
            continue
        rng = stream_rng(seed, _MODALITY_STREAM + m)
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
