"""A disk cache of frozen-backbone features, so that heads train on them in milliseconds.

Features are extracted once per (dataset fingerprint, split, backbone, weights, transform) with
the backbone in eval mode and no augmentation (the protocol of the XRM and MAT papers'
precomputed Waterbirds features), and stored as safetensors under
`<data_dir>/features/<dataset>/<split>-<backbone>-<weights>-<key>.safetensors`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from robustbench_mat.data import stable_hash
from robustbench_mat.loading import Loading, finish_batch


def feature_file(
    data_dir: Path, dataset: str, split: str, backbone: str, weights: str, key: Mapping[str, Any]
) -> Path:
    digest = stable_hash(
        {"dataset": dataset, "split": split, "backbone": backbone, "weights": weights, **key}
    )
    return data_dir / "features" / dataset / f"{split}-{backbone}-{weights}-{digest}.safetensors"


@torch.inference_mode()
def extract_features(
    backbone: torch.nn.Module,
    inputs: torch.utils.data.Dataset,
    batch_size: int = 64,
    show_progress: bool = True,
    description: str = "extracting features",
    device: torch.device | None = None,
    loading: Loading | None = None,
) -> torch.Tensor:
    """`backbone(x)` for every item of `inputs`, in order, as one float32 tensor on the CPU,
    read with `loading` (the run's loader workers; default: in this process)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = backbone.to(device).eval()
    loader = (loading or Loading()).loader(inputs, batch_size=batch_size, shuffle=False)
    outputs = []
    with tqdm(total=len(inputs), desc=description, disable=not show_progress, unit="ex") as bar:
        for x in loader:
            x = finish_batch(inputs, x.to(device, non_blocking=True))
            outputs.append(backbone(x).float().cpu())
            bar.update(len(x))
    return torch.cat(outputs)


def cached_features(
    path: Path,
    build_backbone: Callable[[], torch.nn.Module],
    inputs: Callable[[], torch.utils.data.Dataset],
    show_progress: bool = True,
    batch_size: int = 64,
    device: torch.device | None = None,
    loading: Loading | None = None,
) -> torch.Tensor:
    """The features stored at `path`, extracted on `device` with `loading` (and stored
    atomically) on first use."""
    if path.exists():
        return load_file(path)["features"]
    features = extract_features(
        build_backbone(),
        inputs(),
        batch_size=batch_size,
        show_progress=show_progress,
        description=f"features {path.parent.name}/{path.name.split('-')[0]}",
        device=device,
        loading=loading,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"features": features.contiguous()}, tmp)
    os.replace(tmp, path)
    return features
