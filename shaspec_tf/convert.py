"""Load weights of the official PyTorch ShaSpec (``DualNet_SS``) into :func:`shaspec_tf.build_segmenter`.

Build the model with ``build_segmenter("paper", official_parity=True)`` (first-available missing feature, unmasked
auxiliary losses, PyTorch's symmetric padding) and it computes what the official model computes:

    >>> model = shaspec_tf.build_segmenter("paper", official_parity=True)
    >>> load_official_state_dict(model, "checkpoint.pth")        # torch needed for .pth; or a .npz / a dict

Layouts: PyTorch ``Conv3d`` weights ``(out, in, kd, kh, kw)`` and ``ConvTranspose3d`` weights ``(in, out, kd, kh,
kw)`` both become Keras' ``(kd, kh, kw, in|out, out|in)`` by the same axis permutation; ``Linear`` weights are
transposed; instance-norm ``weight``/``bias`` become ``gamma``/``beta``. Input volumes ``[N, 4, D, H, W]`` become
``[N, D, H, W, 4]``; logit channels stay ET, WT, TC.
"""
from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np

from shaspec_tf import fileio

ENCODER_PREFIXES = {"shared_enc": "shared_encoder", "flair_enc": "flair_encoder", "t1_enc": "t1_encoder",
                     "t1ce_enc": "t1ce_encoder", "t2_enc": "t2_encoder"}

# (pattern over the key below an encoder / decoder prefix, replacement path)
_ENCODER_RULES = [
    (r"backbone\.conv1\.weight", "trunk/stem/conv/conv/kernel"),
    (r"backbone\.norm1\.(weight|bias)", "trunk/stem/norm/{norm}"),
    (r"backbone\.layer(\d)\.(\d+)\.conv(\d)\.weight", "trunk/layer{0}_block{1}/unit{2}/conv/conv/kernel"),
    (r"backbone\.layer(\d)\.(\d+)\.norm(\d)\.(weight|bias)", "trunk/layer{0}_block{1}/unit{2}/norm/{norm}"),
    (r"backbone\.layer(\d)\.(\d+)\.downsample\.0\.weight", "trunk/layer{0}_block{1}/shortcut/conv/conv/kernel"),
    (r"backbone\.layer(\d)\.(\d+)\.downsample\.1\.(weight|bias)", "trunk/layer{0}_block{1}/shortcut/norm/{norm}"),
    (r"asppreduce\.0\.weight", "reduce/conv/conv/kernel"),
    (r"asppreduce\.1\.(weight|bias)", "reduce/norm/{norm}"),
    (r"aspp\.branch([1-4])\.0\.weight", "aspp/branch{0}/conv/conv/kernel"),
    (r"aspp\.branch([1-4])\.1\.(weight|bias)", "aspp/branch{0}/norm/{norm}"),
    (r"aspp\.branch5_conv\.weight", "aspp/image_pool/conv/conv/kernel"),
    (r"aspp\.branch5_norm\.(weight|bias)", "aspp/image_pool/norm/{norm}"),
    (r"aspp\.conv_cat\.0\.weight", "aspp/project/conv/conv/kernel"),
    (r"aspp\.conv_cat\.1\.(weight|bias)", "aspp/project/norm/{norm}"),
]
_DECODER_RULES = [
    (r"shortcut_conv(\d)\.0\.weight", "decoder/skip{0}/conv/conv/kernel"),
    (r"shortcut_conv(\d)\.1\.(weight|bias)", "decoder/skip{0}/norm/{norm}"),
    (r"transposeconv_stage(\d)\.weight", "decoder/up{0}/kernel"),
    (r"stage(\d)_de\.conv(\d)\.weight", "decoder/block{0}/unit{1}/conv/conv/kernel"),
    (r"stage(\d)_de\.norm(\d)\.(weight|bias)", "decoder/block{0}/unit{1}/norm/{norm}"),
    (r"cls_conv\.0\.weight", "decoder/head/kernel"),
]
_TOP_RULES = [
    (r"compos_layer\.conv\.weight", "fusion/proj/conv/kernel"),
    (r"dom_classifier\.weight", "domain_classifier/dense/kernel"),
    (r"dom_classifier\.bias", "domain_classifier/dense/bias"),
]


def _apply(rules, key):
    for pattern, template in rules:
        match = re.fullmatch(pattern, key)
        if match:
            groups = list(match.groups())
            norm = None
            if groups and groups[-1] in ("weight", "bias"):
                norm = "gamma" if groups.pop() == "weight" else "beta"
            return template.format(*groups, norm=norm)
    return None


def official_key_to_path(key: str) -> str | None:
    """The Keras variable path for an official ``DualNet_SS`` state-dict key (``None`` if it has no counterpart)."""
    head, _, rest = key.partition(".")
    if head in ENCODER_PREFIXES:
        path = _apply(_ENCODER_RULES, rest)
        return f"{ENCODER_PREFIXES[head]}/{path}" if path else None
    if head == "shared_dec":
        return _apply(_DECODER_RULES, rest)
    return _apply(_TOP_RULES, key)


def convert_tensor(key: str, value: np.ndarray) -> np.ndarray:
    """PyTorch layout -> Keras layout for one tensor."""
    value = np.asarray(value, dtype=np.float32)
    if value.ndim == 5:  # Conv3d (out, in, k, k, k) and ConvTranspose3d (in, out, k, k, k) alike
        return np.transpose(value, (2, 3, 4, 1, 0))
    if value.ndim == 2:  # Linear (out, in)
        return value.T
    return value


def _torch_checkpoint(path: str, local: str, trust_pickle: bool):
    """The object stored in the PyTorch checkpoint ``path`` (read from its local copy ``local``)."""
    try:
        import torch  # optional: only to read PyTorch checkpoints
    except ImportError as error:
        raise ImportError(f"reading {path} needs torch; save it as .npz with numpy instead") from error
    try:
        return torch.load(local, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickled nn.Module is refused by the safe loader
        if not trust_pickle:
            raise ValueError(f"{path} is not a plain state dict (official training snapshots pickle the whole "
                             f"model): pass trust_pickle=True for a file you trust, with the official code "
                             f"importable, or save checkpoint['model'].state_dict() instead") from error
        return torch.load(local, map_location="cpu", weights_only=False)


def read_state_dict(source, trust_pickle: bool = False) -> Mapping[str, np.ndarray]:
    """A state dict from a mapping, a ``.npz`` file, or a ``.pth``/``.pt`` file (needs torch).

    The official ``train_SS.py`` snapshots (``final.pth``) are ``{'model': <the nn.Module>, 'optimizer', 'iter'}``:
    the whole module is pickled, so reading one runs pickled code and needs the official ``DualNet_SS`` importable.
    That happens only with ``trust_pickle=True``, for files you trust; plain state dicts load safely without it.
    """
    if isinstance(source, Mapping):
        return {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in source.items()}
    path = os.fspath(source)
    if not fileio.exists(path):
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    with fileio.local_copy(path) as local:  # a URI (gs://...) is downloaded first
        if path.endswith(".npz"):  # its keys are kept verbatim
            with np.load(local) as data:
                return {k: data[k] for k in data.files}
        state = _torch_checkpoint(path, local, trust_pickle)
    if isinstance(state, Mapping) and "model" in state:
        state = state["model"]  # official snapshot: {'model': module or state dict, 'optimizer': ..., 'iter': ...}
    if hasattr(state, "state_dict"):
        state = state.state_dict()
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return read_state_dict(state)


def load_official_state_dict(model, state_dict, strict: bool = True, trust_pickle: bool = False) -> dict:
    """Assign an official ``DualNet_SS`` state dict to ``model``'s variables.

    Every official tensor must map onto a variable of the same shape and, with ``strict``, every model variable must
    receive one; otherwise a ``ValueError`` lists what did not match and nothing is assigned. Returns
    ``{official_key: keras_path}``. ``trust_pickle``: see :func:`read_state_dict`.
    """
    config = getattr(model, "shaspec_config", {})
    if config.get("fusion_init", "standardised") != "standardised":
        raise ValueError(f"{model.name} has fusion_init={config['fusion_init']!r}, but the official fusion projection "
                         f"is weight-standardised; build it with official_parity=True (or fusion_init='standardised')")
    state = read_state_dict(state_dict, trust_pickle=trust_pickle)
    variables = {v.path: v for v in model.weights}
    mapping, unknown, mismatched = {}, [], []
    for key, value in state.items():
        path = official_key_to_path(key)
        if path is None or path not in variables:
            unknown.append(f"{key} -> {path}")
            continue
        converted = convert_tensor(key, value)
        if tuple(converted.shape) != tuple(variables[path].shape):
            mismatched.append(f"{key} {tuple(converted.shape)} vs {path} {tuple(variables[path].shape)}")
            continue
        mapping[key] = (path, converted)
    missing = sorted(set(variables) - {path for path, _ in mapping.values()})
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} official tensor(s) without a counterpart (first: {unknown[:3]})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) (first: {mismatched[:3]}); build the model with the "
                        f"preset the checkpoint was trained with ('paper')")
    if strict and missing:
        problems.append(f"{len(missing)} model variable(s) not in the checkpoint (first: {missing[:3]})")
    if problems:
        raise ValueError("cannot load official state dict: " + "; ".join(problems))
    for path, value in mapping.values():
        variables[path].assign(value)
    return {key: path for key, (path, _) in mapping.items()}
