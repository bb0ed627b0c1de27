"""MultiNLI with the negation attribute (Sagawa et al. 2020)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from robustbench_mat.data import SplitArrays
from robustbench_mat.errors import UserError
from robustbench_mat.hparams import HParam
from robustbench_mat.metadata import UpstreamFile, require_columns, write_table
from robustbench_mat.protocols import XRM_CODE_OPTIMIZERS, PaperSetup
from robustbench_mat.registry import register_dataset
from robustbench_mat.text import TextBenchmark, text_params

CACHED = (
    "cached_train_bert-base-uncased_128_mnli",
    "cached_dev_bert-base-uncased_128_mnli",
    "cached_dev_bert-base-uncased_128_mnli-mm",
)
TOKENS_FILE = "multinli_tokens.safetensors"
FIELDS = ("input_ids", "input_mask", "segment_ids")


class InputFeatures:
    """Stand-in for `utils_glue.InputFeatures` (the class the upstream features were pickled
    with): the restricted unpickler builds these, and nothing else, from the cached files."""

    input_ids: list[int]
    input_mask: list[int]
    segment_ids: list[int]
    label_id: int


def read_cached_features(path: Path) -> torch.Tensor:
    """The [N, 128, 3] int32 tokens (ids, mask, segment ids) of one upstream cached file.

    The file is a torch-pickled list of `utils_glue.InputFeatures`. It is read with torch's
    weights-only unpickler, which refuses every global except the ones allowed here (the class
    name `utils_glue.InputFeatures`, mapped to the inert stand-in above): a tampered file cannot
    run code."""
    try:
        with torch.serialization.safe_globals([(InputFeatures, "utils_glue.InputFeatures")]):
            items = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0][:300]
        raise UserError(
            f"{path}: refused or unreadable ({first}); only lists of utils_glue.InputFeatures "
            f"are accepted: download the file anew"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise UserError(f"{path}: unreadable ({error}); download it anew") from None
    if not isinstance(items, list) or not all(isinstance(i, InputFeatures) for i in items):
        raise UserError(f"{path}: expected a list of InputFeatures objects")
    try:
        rows = [[getattr(item, field) for field in FIELDS] for item in items]
        tokens = torch.tensor(rows, dtype=torch.int32)  # [N, 3, L]
    except (AttributeError, ValueError, TypeError) as error:
        raise UserError(f"{path}: malformed InputFeatures ({error})") from None
    return tokens.transpose(1, 2).contiguous()


def find_cached(root: Path, name: str) -> Path:
    for candidate in (root / "glue_data" / "MNLI" / name, *sorted(root.rglob(name))):
        if candidate.is_file():
            return candidate
    raise UserError(f"{name} not found under {root}")


@register_dataset("multinli")
class MultiNLI(TextBenchmark):
    """MultiNLI: y = contradiction/entailment/neutral, a = negation word in the hypothesis.

    Upstream (the GroupDRO release): the BERT features `multinli_bert_features.tar.gz`,
    extracted into `<data_dir>/multinli/glue_data/MNLI/` (three torch-pickled lists of
    `InputFeatures`: train, dev matched, dev mismatched, 128 tokens of bert-base-uncased), and
    `metadata_random.csv` (gold_label, sentence2_has_negation, split: a random re-split of about
    206k/82k/124k). `prepare` reads the pickles once with a restricted unpickler and stores the
    tokens as plain int32 tensors (`multinli_tokens.safetensors`). Six groups; the minorities
    (entailment, negation) and (neutral, negation) hold about 1.5-2k training examples.
    """

    paper = "Williams et al. 2018; Sagawa et al. 2020 (GroupDRO)"
    n_classes = 3
    n_attributes = 2
    class_names = ("contradiction", "entailment", "neutral")
    attribute_names = ("no-negation", "negation")
    folder = "multinli"
    metadata_name = "multinli"
    default_steps = 30_000
    default_eval_every = 1000
    paper_setup = PaperSetup(60_001, 250, XRM_CODE_OPTIMIZERS["text"])
    params = {
        **text_params(),
        "max_length": HParam(
            128, "tokens kept of the stored 128 (fewer: faster smoke runs)", ge=1, le=128
        ),
    }
    upstream = (
        UpstreamFile(
            url="https://nlp.stanford.edu/data/dro/multinli_bert_features.tar.gz",
            filename="multinli_bert_features.tar.gz",
            provides=tuple(f"**/{name}" for name in CACHED),
            extract=True,
            extract_to="glue_data/MNLI",
            note="the three cached_* files go in glue_data/MNLI/",
        ),
        UpstreamFile(
            url="https://raw.githubusercontent.com/kohpangwei/group_DRO/master/"
            "dataset_metadata/multinli/metadata_random.csv",
            filename="metadata_random.csv",
            provides=("metadata_random.csv",),
        ),
    )

    @classmethod
    def convert(cls, root: Path) -> list[Path]:
        import pandas as pd  # here, not when `list` imports the plugin

        source = root / "metadata_random.csv"
        try:
            frame = pd.read_csv(source, index_col=0)
        except (pd.errors.ParserError, UnicodeDecodeError) as error:
            raise UserError(f"{source}: unreadable ({error}); download it anew") from None
        require_columns(frame, source, ("gold_label", "sentence2_has_negation", "split"))
        parts = [read_cached_features(find_cached(root, name)) for name in CACHED]
        tokens = torch.cat(parts)
        if len(tokens) != len(frame):
            raise UserError(
                f"{source} has {len(frame)} rows but the cached features hold {len(tokens)} "
                f"({' + '.join(str(len(p)) for p in parts)}); download both anew"
            )
        tokens_path = root / TOKENS_FILE
        tmp = root / f".{TOKENS_FILE}.tmp"
        save_file({"tokens": tokens}, tmp)
        os.replace(tmp, tokens_path)
        index = list(range(len(frame)))
        metadata = pd.DataFrame(
            {
                "id": index,
                "filename": index,
                "split": frame["split"].to_numpy(),
                "y": frame["gold_label"].to_numpy(),
                "a": frame["sentence2_has_negation"].to_numpy(),
            }
        )
        target = root / "metadata_multinli.csv"
        write_table(metadata, target)
        return [target, tokens_path]

    @classmethod
    def prepared_files(cls, data_dir: str | Path | None) -> list[Path]:
        return [cls.metadata_file(data_dir), cls.dataset_root(data_dir) / TOKENS_FILE]

    def tokens(self) -> torch.Tensor:
        cached = getattr(self, "_tokens", None)
        if cached is None:
            path = self.require(self.prepared_files(self.data_dir)[1])
            cached = self._tokens = load_file(path)["tokens"]
        return cached

    def load_split(self, split: str) -> SplitArrays:
        frame = self.split_frame(split)
        tokens = self.tokens()
        rows = torch.as_tensor(frame["filename"].astype(int).to_numpy(copy=True))
        if len(rows) and int(rows.max()) >= len(tokens):
            raise UserError(
                f"{self.metadata_file(self.data_dir)}: filename {int(rows.max())} is beyond the "
                f"{len(tokens)} stored examples; prepare the dataset again"
            )
        selected = tokens[rows, : self.config["max_length"]]
        y = torch.as_tensor(frame["y"].to_numpy(copy=True), dtype=torch.long)
        a = torch.as_tensor(frame["a"].to_numpy(copy=True), dtype=torch.long)
        # int32 in memory (half of int64); the text classifier casts each batch to long
        return SplitArrays(selected.contiguous(), y, a)
