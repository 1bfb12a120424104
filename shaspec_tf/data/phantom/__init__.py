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
from .anatomy import (BRATS_SHAPE, DEFAULT_SHAPE, FOV_MM, LABELS, PHANTOM_VERSION, SEG_SUFFIX, make_phantom_case,
                      phantom_affine, phantom_case_seed, phantom_spacing)
from .dataset import KIND, MANIFEST, drops, legacy_output, save_nifti, write_phantom_dataset

__all__ = ["BRATS_SHAPE", "DEFAULT_SHAPE", "FOV_MM", "KIND", "LABELS", "MANIFEST", "PHANTOM_VERSION", "SEG_SUFFIX",
           "drops", "legacy_output", "make_phantom_case", "phantom_affine", "phantom_case_seed", "phantom_spacing",
           "save_nifti", "write_phantom_dataset"]
