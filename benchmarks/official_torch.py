"""The official PyTorch ShaSpec (``DualNet_SS`` of github.com/billhhh/ShaSpec) as a benchmark worker: a training step
with the official loss and whole-volume inference by a device-side loop, for ``train_step_benchmark.py``."""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from bench_common import cpu_name, max_rss_bytes, memory_entry, summarize, toy_data


def _official_setup(spec):
    import importlib.machinery
    import types

    import torch

    try:  # before the stand-ins below: torch._dynamo looks up the specs of optional modules when it loads
        import torch._dynamo  # noqa: F401
    except Exception:  # noqa: BLE001 - older torch
        pass

    # Imported at module level by the official files but not used here: stand-ins where they are not installed.
    for name in ("sklearn", "sklearn.manifold", "matplotlib", "matplotlib.pyplot", "scipy", "scipy.ndimage"):
        try:
            __import__(name)
        except ImportError:
            module = sys.modules[name] = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, module)
            if name == "sklearn.manifold":
                module.TSNE = object
    import torch.nn.functional as F

    for name in ("_verify_spatial_size", "_verify_batch_size"):  # instance norm on the 1x1x1 ASPP image pool
        if hasattr(F, name):
            setattr(F, name, lambda *a, **k: None)
    sys.path.insert(0, os.path.abspath(spec["official"]))
    import random

    random.seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    from DualNet_SS import DualNet_SS

    model = DualNet_SS(types.SimpleNamespace(input_size=",".join(map(str, spec["crop"]))), norm_cfg="IN",
                       activation_cfg="LeakyReLU", num_classes=3, weight_std=True).to(device)
    return torch, device, model


def _torch_sync(torch, device):
    if device == "cuda":
        torch.cuda.synchronize()


def _torch_device_name(torch, device) -> str:
    return f"cuda: {torch.cuda.get_device_name(0)}" if device == "cuda" else cpu_name()


def _torch_peak_memory(torch, device) -> dict:
    if device == "cuda":
        return memory_entry(torch.cuda.max_memory_allocated(), "device_max_memory_allocated")
    return memory_entry(max_rss_bytes(), "process_max_rss")


def official_train(spec) -> dict:
    torch, device, model = _official_setup(spec)
    import loss_Dual

    model.train()
    opt = torch.optim.SGD(model.parameters(), spec["lr"], momentum=0.99, nesterov=True)
    images, regions = toy_data(spec["crop"], spec["batch"], spec["seed"])
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 4, 1, 2, 3))).to(device)
    y = torch.from_numpy(np.ascontiguousarray(regions.transpose(0, 4, 1, 2, 3))).to(device)
    dice, bce, l1, ce = loss_Dual.DiceLoss4BraTS(), loss_Dual.BCELoss4BraTS(), torch.nn.L1Loss(), \
        torch.nn.CrossEntropyLoss()
    amp = spec["precision"] == "bf16"
    n, c = x.shape[:2]
    domain_labels = torch.arange(c, device=device).repeat(n)
    losses, modes = [], []

    def step(mode):
        _torch_sync(torch, device)
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            pred, shared, spec_logits, mode_split = model(x, mode=mode)
            s = shared
            alignment = l1(s[0::c], s[1::c]) + l1(s[1::c], s[2::c]) + l1(s[2::c], s[3::c]) + l1(s[3::c], s[0::c])
            loss = (dice(pred, y) + bce(pred, y) + 0.1 * alignment
                    + 0.02 * ce(spec_logits.float().reshape(n * c, -1), domain_labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss)  # synchronises
        _torch_sync(torch, device)
        losses.append(value)
        modes.append(sorted(int(m) for m in mode_split))
        return time.perf_counter() - start

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warm = [step("0,1,2,3")]
    # From the worker's launch: interpreter start, imports, model build, cuDNN autotuning, the first step.
    startup = {"first_step_s": warm[0],
               "to_first_step_s": time.time() - spec["launched_at"] if spec.get("launched_at") else None}
    warm += [step("0,1,2,3") for _ in range(max(1, spec["warmup"]) - 1)]
    timed = [step("0,1,2,3") for _ in range(spec["steps"])]
    random_timed = [step("random") for _ in range(spec["random_steps"])]
    return {"device": _torch_device_name(torch, device), "torch": torch.__version__,
            "params": int(sum(p.numel() for p in model.parameters())), "precision": spec["precision"],
            "first_step_s": warm[0], "startup": startup, "warmup": summarize(warm), "all_modalities": summarize(timed),
            "random_modalities": dict(summarize(random_timed), modes=modes[len(warm) + len(timed):]),
            "losses": losses, "all_finite": bool(np.all(np.isfinite(losses))),
            "peak_memory": _torch_peak_memory(torch, device)}


def official_infer(spec) -> dict:
    torch, device, model = _official_setup(spec)
    model.eval()
    volume, roi = tuple(spec["volume"]), tuple(spec["crop"])
    padded = tuple(max(v, r) for v, r in zip(volume, roi))
    image = toy_data(volume, 1, spec["seed"])[0]
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 4, 1, 2, 3))).to(device)
    if padded != volume:
        x = torch.nn.functional.pad(x, [p for v, q in zip(volume[::-1], padded[::-1]) for p in (0, q - v)])
    starts = [tuple(start) for start in spec["tile_starts"]]
    amp, k = spec["precision"] == "bf16", spec["sw_batch_size"]

    def run():
        _torch_sync(torch, device)
        start = time.perf_counter()
        full = torch.zeros((1, 3) + padded, device=device)
        count = torch.zeros((1, 1) + padded, device=device)
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            for first in range(0, len(starts), k):
                batch = starts[first:first + k]
                slices = [(slice(None), slice(None)) + tuple(slice(s, s + r) for s, r in zip(st, roi)) for st in batch]
                tiles = torch.cat([x[sl] for sl in slices])
                pred = model(tiles, val=True, mode="0,1,2,3")[0]
                prob = torch.sigmoid(pred.float())
                for i, sl in enumerate(slices):
                    full[sl] += prob[i:i + 1]
                    count[sl] += 1
        out = (full / count)[(slice(None), slice(None)) + tuple(slice(0, v) for v in volume)]
        finite = bool(torch.isfinite(out).all())
        _torch_sync(torch, device)
        return time.perf_counter() - start, finite

    first, finite = run()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [run()[0] for _ in range(spec["infer_reps"])]
    return dict({"device": _torch_device_name(torch, device), "torch": torch.__version__,
                 "precision": spec["precision"], "volume": list(volume), "roi": list(roi),
                 "overlap": spec["overlap"], "sw_batch_size": k, "tiles": len(starts),
                 "blending": "uniform average, device", "first_s": first, "reps": len(times),
                 "output_finite": finite, "peak_memory": _torch_peak_memory(torch, device)},
                **{key: v for key, v in summarize(times).items() if key != "n"})

