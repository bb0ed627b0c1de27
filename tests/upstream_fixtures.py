"""Tiny copies of the upstream dataset files, in their exact formats (see datasets.md), with the
split and group proportions of the real datasets scaled down."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd

# Waterbirds groups (landbird/land, landbird/water, waterbird/land, waterbird/water):
# train 3498/184/56/1057 scaled by 1/28; val 467/466/133/133 and test (balanced within class)
# scaled down to a handful.
WATERBIRDS_GROUPS = {0: (125, 7, 2, 38), 1: (17, 17, 5, 5), 2: (16, 16, 4, 4)}
# CelebA groups (not-blond/female, not-blond/male, blond/female, blond/male): train 71629 /
# 66874 / 22880 / 1387 scaled by 1/1000 (blond men kept at 2), val and test about 1/1000.
CELEBA_GROUPS = {0: (72, 67, 23, 2), 1: (9, 8, 3, 1), 2: (10, 8, 3, 1)}
CELEBA_NAMES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes "
    "No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling "
    "Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace "
    "Wearing_Necktie Young"
).split()
# MultiNLI groups (y x negation): train 57498/11158/67376/1521/66630/1992 scaled by 1/1000;
# val and test about 1/2000 of 82k and 124k.
MULTINLI_GROUPS = {0: (57, 11, 67, 2, 67, 2), 1: (14, 3, 17, 1, 17, 1), 2: (20, 4, 25, 1, 25, 1)}
# CivilComments: 269,038 / 45,180 / 133,782 comments scaled by 1/1000.
CIVIL_SPLITS = {"train": 269, "val": 45, "test": 134}
IDENTITIES = ("male", "female", "LGBTQ", "christian", "muslim", "other_religions", "black", "white")


def _jpeg(path: Path, colour: tuple[int, int, int], size: tuple[int, int], seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.clip(
        np.array(colour)[None, None, :] + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255
    ).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=80)


def write_waterbirds(root: Path) -> Path:
    """`<root>/waterbird_complete95_forest2water2/` with species folders and metadata.csv."""
    folder = root / "waterbird_complete95_forest2water2"
    rows, index = [], 0
    for split, counts in WATERBIRDS_GROUPS.items():
        for group, count in enumerate(counts):
            y, place = divmod(group, 2)
            species = "001.Black_footed_Albatross" if y else "100.Brown_Pelican_land"
            for _ in range(count):
                index += 1
                name = f"{species}/Bird_{index:04d}.jpg"
                colour = (40 + 150 * place, 120, 200 - 150 * y)
                _jpeg(folder / name, colour, (24, 20), index)
                rows.append((index, name, y, split, place, f"water/{index}.jpg"))
    frame = pd.DataFrame(
        rows, columns=["img_id", "img_filename", "y", "split", "place", "place_filename"]
    )
    frame.to_csv(folder / "metadata.csv", index=False)
    return folder


def write_celeba(root: Path) -> Path:
    """`img_align_celeba/`, `list_eval_partition.txt` and `list_attr_celeba.txt` in `root`."""
    rng = np.random.default_rng(0)
    entries = []
    for split, counts in CELEBA_GROUPS.items():
        for group, count in enumerate(counts):
            entries += [(split, *divmod(group, 2))] * count
    order = rng.permutation(len(entries))
    partition, attributes = [], [f"{len(entries)}", " ".join(CELEBA_NAMES)]
    for number, position in enumerate(order, start=1):
        split, blond, male = entries[position]
        name = f"{number:06d}.jpg"
        values = rng.choice(["-1", "1"], size=40)
        values[9], values[20] = ("1" if blond else "-1"), ("1" if male else "-1")
        partition.append(f"{name} {split}")
        attributes.append(f"{name} " + " ".join(f"{v:>2}" for v in values))
        _jpeg(root / "img_align_celeba" / name, (200 * blond, 80, 150 * male), (178, 218), number)
    (root / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    (root / "list_attr_celeba.txt").write_text("\n".join(attributes) + "\n")
    return root


UTILS_GLUE = '''
class InputFeatures(object):
    """A single set of features of data (as in the GroupDRO repository's utils_glue.py)."""

    def __init__(self, input_ids, input_mask, segment_ids, label_id):
        self.input_ids = input_ids
        self.input_mask = input_mask
        self.segment_ids = segment_ids
        self.label_id = label_id
'''


def utils_glue_module(directory: Path):
    """Import a module `utils_glue` with class `InputFeatures` from `directory`."""
    import importlib

    (directory / "utils_glue.py").write_text(UTILS_GLUE)
    sys.path.insert(0, str(directory))
    try:
        sys.modules.pop("utils_glue", None)
        return importlib.import_module("utils_glue")
    finally:
        sys.path.remove(str(directory))


def write_multinli(root: Path, module_dir: Path, extra: object = None) -> Path:
    """`glue_data/MNLI/cached_*` (torch-pickled lists of utils_glue.InputFeatures) and
    `metadata_random.csv` in `root`. `extra` is appended to the first list (tests of the
    restricted unpickler)."""
    import torch

    utils_glue = utils_glue_module(module_dir)
    rng = np.random.default_rng(0)
    labels, negations, splits = [], [], []
    for split, counts in MULTINLI_GROUPS.items():
        for group, count in enumerate(counts):
            y, a = divmod(group, 2)
            labels += [y] * count
            negations += [a] * count
            splits += [split] * count
    order = rng.permutation(len(labels))  # a random re-split: rows of all splits interleave
    labels = np.array(labels)[order]
    negations = np.array(negations)[order]
    splits = np.array(splits)[order]
    features = []
    for y, a in zip(labels, negations, strict=True):
        length = int(rng.integers(8, 40))
        ids = [101] + rng.integers(1000, 30000, length - 2).tolist() + [102]
        if a:
            ids[3] = 2053  # "no"
        ids[1] = 2000 + int(y)
        pad = 128 - length
        features.append(
            utils_glue.InputFeatures(ids + [0] * pad, [1] * length + [0] * pad, [0] * 128, int(y))
        )
    folder = root / "glue_data" / "MNLI"
    folder.mkdir(parents=True, exist_ok=True)
    thirds = np.array_split(np.arange(len(features)), 3)
    names = (
        "cached_train_bert-base-uncased_128_mnli",
        "cached_dev_bert-base-uncased_128_mnli",
        "cached_dev_bert-base-uncased_128_mnli-mm",
    )
    for k, (name, part) in enumerate(zip(names, thirds, strict=True)):
        items = [features[i] for i in part]
        if k == 0 and extra is not None:
            items.append(extra)
        torch.save(items, folder / name)
    pd.DataFrame(
        {"gold_label": labels, "sentence2_has_negation": negations, "split": splits}
    ).to_csv(root / "metadata_random.csv")
    return root


def civilcomments_frame(splits: dict[str, int] = CIVIL_SPLITS, seed: int = 0) -> pd.DataFrame:
    """`all_data_with_identities.csv` rows: about 45% of comments mention an identity (a tenth
    of those two), about 12% are toxic."""
    rng = np.random.default_rng(seed)
    n = sum(splits.values())
    split = np.repeat(list(splits), list(splits.values()))
    toxicity = np.where(rng.random(n) < 0.12, rng.uniform(0.5, 1.0, n), rng.uniform(0, 0.49, n))
    identity = np.zeros((n, len(IDENTITIES)), dtype=np.float32)
    mentions = rng.random(n) < 0.45
    first = rng.integers(0, len(IDENTITIES), n)
    identity[mentions, first[mentions]] = rng.uniform(0.5, 1.0, mentions.sum())
    second = mentions & (rng.random(n) < 0.1)
    identity[second, (first[second] + 1) % len(IDENTITIES)] = 0.8
    low = ~mentions & (rng.random(n) < 0.3)  # mentioned weakly: below 0.5, not active
    identity[low, first[low]] = 0.2
    words = np.array(["good", "bad", "people", "comment", "article", "nice", "stupid", "law"])
    text = [
        " ".join(rng.choice(words, rng.integers(3, 12))) + ("," if i % 7 == 0 else "")
        for i in range(n)
    ]
    frame = pd.DataFrame(
        {
            "id": np.arange(1000, 1000 + n),
            "comment_text": text,
            "split": split,
            "toxicity": toxicity.round(4),
            "severe_toxicity": 0.0,
            **{name: identity[:, k] for k, name in enumerate(IDENTITIES)},
            "identity_any": (identity >= 0.5).any(1).astype(int),
        }
    )
    frame.loc[2, "comment_text"] = 'a comment, with "quotes"\nand a newline'
    return frame


def write_civilcomments(root: Path, splits: dict[str, int] = CIVIL_SPLITS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "all_data_with_identities.csv"
    civilcomments_frame(splits).to_csv(path)  # the index column comes first, unnamed
    return path


def tar_folder(source: Path, archive: Path, arcname: str | None = None) -> Path:
    with tarfile.open(archive, "w:gz") as bundle:
        bundle.add(source, arcname=arcname or source.name)
    return archive
