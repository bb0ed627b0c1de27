"""CivilComments (WILDS v1.0): toxicity classification with identity mentions as attributes.

Two datasets share this module: `civilcomments` (coarse) and `civilcomments-fine`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from robustbench_mat.data import EvalGroups, SplitArrays, stable_hash
from robustbench_mat.errors import UserError
from robustbench_mat.hparams import HParam
from robustbench_mat.metadata import UpstreamFile, file_fingerprint, require_columns, write_table
from robustbench_mat.protocols import XRM_CODE_OPTIMIZERS, PaperSetup
from robustbench_mat.registry import register_dataset
from robustbench_mat.text import TextBenchmark, cached_tokens, text_params, tokenizer_identity

if TYPE_CHECKING:  # pandas is imported where a table is read or written, not by `list`
    import pandas as pd

IDENTITIES = ("male", "female", "LGBTQ", "christian", "muslim", "other_religions", "black", "white")
SOURCE = "all_data_with_identities.csv"
SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
CLASS_NAMES = ("non-toxic", "toxic")
EVAL_GROUP_NAMES = tuple(f"{c}/{i}" for c in CLASS_NAMES for i in IDENTITIES)


def read_upstream(source: Path) -> pd.DataFrame:
    """The columns of `all_data_with_identities.csv` the conversion needs, validated."""
    import pandas as pd  # here, not when `list` imports the plugin

    try:
        header = pd.read_csv(source, nrows=0).columns
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise UserError(f"{source}: unreadable ({error}); download it anew") from None
    needed = ("comment_text", "split", "toxicity", *IDENTITIES)
    require_columns(pd.DataFrame(columns=header), source, needed)
    index = header[0]
    dtypes = {name: "float32" for name in ("toxicity", *IDENTITIES)}
    try:
        frame = pd.read_csv(
            source,
            usecols=[index, *needed],
            index_col=index,
            dtype={**dtypes, "comment_text": str, "split": str},
            keep_default_na=False,
            na_values={name: [""] for name in dtypes},
        )
    except (pd.errors.ParserError, ValueError) as error:
        raise UserError(f"{source}: unreadable row: {str(error).strip()[:300]}") from None
    bad_split = ~frame["split"].isin(list(SPLIT_CODE))
    if bad_split.any():
        row = int(np.flatnonzero(bad_split.to_numpy())[0])
        raise UserError(
            f"{source}, line {row + 2}: bad split {frame['split'].iloc[row]!r}; expected "
            f"train, val or test"
        )
    bad_toxicity = frame["toxicity"].isna()
    if bad_toxicity.any():
        row = int(np.flatnonzero(bad_toxicity.to_numpy())[0])
        raise UserError(f"{source}, line {row + 2}: missing toxicity")
    return frame


def convert_civilcomments(root: Path, fine: bool) -> list[Path]:
    """Write `metadata_civilcomments_<variant>.csv` (id,filename,split,y,a plus the eight
    identity indicators) and `civilcomments_<variant>.csv` (the texts, indexed by filename)."""
    import pandas as pd  # here, not when `list` imports the plugin

    frame = read_upstream(root / SOURCE)
    split = frame["split"].map(SPLIT_CODE).to_numpy(np.int8)
    y = (frame["toxicity"].to_numpy() >= 0.5).astype(np.int8)
    # A missing identity value (comments that were not annotated) counts as not mentioned.
    active = np.nan_to_num(frame[list(IDENTITIES)].to_numpy(np.float32), nan=0.0) >= 0.5
    filename = frame.index.to_numpy()
    rows, attributes = [], []
    if not fine:  # every train comment, a = 1 when it mentions no identity
        train = np.flatnonzero(split == 0)
        rows.append(train)
        attributes.append((~active[train].any(1)).astype(np.int8))
    for k in range(len(IDENTITIES)):  # one row per (comment, identity mentioned)
        chosen = np.flatnonzero(active[:, k] & ((split != 0) | fine))
        rows.append(chosen)
        attributes.append(np.full(len(chosen), k, dtype=np.int8))
    row = np.concatenate(rows)
    metadata = pd.DataFrame(
        {
            "id": np.arange(len(row)),
            "filename": filename[row],
            "split": split[row],
            "y": y[row],
            "a": np.concatenate(attributes),
        }
    )
    for k, name in enumerate(IDENTITIES):
        metadata[name] = active[row, k].astype(np.int8)
    variant = "fine" if fine else "coarse"
    meta_path = root / f"metadata_civilcomments_{variant}.csv"
    text_path = root / f"civilcomments_{variant}.csv"
    used = np.unique(row)
    texts = pd.DataFrame({"comment_text": frame["comment_text"].to_numpy()[used]})
    texts.index = pd.Index(filename[used], name="filename")
    write_table(texts, text_path, index=True)
    write_table(metadata, meta_path)
    return [meta_path, text_path]


class _CivilComments(TextBenchmark):
    fine: ClassVar[bool] = False
    paper = "Borkan et al. 2019; WILDS (Koh et al. 2021)"
    n_classes = 2
    class_names = CLASS_NAMES
    folder = "civilcomments"
    default_steps = 10_000
    default_eval_every = 1000
    paper_setup = PaperSetup(60_001, 250, XRM_CODE_OPTIMIZERS["text"])
    params = {
        **text_params(),
        "max_length": HParam(220, "tokens per comment (truncated or padded)", ge=1),
    }
    upstream = (
        UpstreamFile(
            url="https://worksheets.codalab.org/rest/bundles/"
            "0x8cd3de0634154aeaad2ee6eb96723c6e/contents/blob/",
            filename="civilcomments_v1.0.tar.gz",
            provides=(SOURCE,),
            extract=True,
            note="the WILDS v1.0 CodaLab bundle, about 90 MB (0.3 GB unpacked, as WILDS states); "
            "WILDS' own downloader fetches it too",
            size=90_644_480,  # the `compressed_size` WILDS declares for this bundle
        ),
    )

    def default_hparams(self) -> dict[str, Any]:
        # Class-balanced batches (88% of training comments are non-toxic), as the MAT paper's
        # code trains on CivilComments.
        return {**super().default_hparams(), "class_balanced": True}

    @classmethod
    def convert(cls, root: Path) -> list[Path]:
        return convert_civilcomments(root, cls.fine)

    @classmethod
    def prepared_files(cls, data_dir: str | Path | None) -> list[Path]:
        variant = "fine" if cls.fine else "coarse"
        return [
            cls.metadata_file(data_dir),
            cls.dataset_root(data_dir) / f"civilcomments_{variant}.csv",
        ]

    def metadata_attribute_limit(self) -> int:
        return len(IDENTITIES)

    def texts(self) -> pd.Series:
        import pandas as pd  # here, not when `list` imports the plugin

        cached = getattr(self, "_texts", None)
        if cached is None:
            path = self.require(self.prepared_files(self.data_dir)[1])
            frame = pd.read_csv(
                path,
                index_col=0,
                dtype={"filename": str, "comment_text": str},
                keep_default_na=False,
            )
            if "comment_text" not in frame.columns:
                raise UserError(f"{path}: missing column comment_text; prepare the dataset again")
            cached = self._texts = frame["comment_text"]
        return cached

    def token_file(self) -> Path:
        """Where the comments' tokens are cached: `<dataset folder>/tokens/<key>.safetensors`,
        keyed by the prepared comments file's content (sha256), the tokenizer
        (`text.tokenizer_identity`) and `max_length`."""
        key = {
            "comments": file_fingerprint(self.prepared_files(self.data_dir)[1]),
            "tokenizer": tokenizer_identity(self.config["backbone"]),
            "max_length": self.config["max_length"],
        }
        return self.dataset_root(self.data_dir) / "tokens" / f"{stable_hash(key, 20)}.safetensors"

    def tokens(self) -> torch.Tensor:
        """The tokens [comments, max_length, 3] of every prepared comment, in the comments
        table's order: tokenised once per (comments, tokenizer, max length), then read from the
        cache."""
        cached = getattr(self, "_tokens", None)
        if cached is None:
            cached = self._tokens = cached_tokens(
                self.token_file(),
                self.texts().tolist(),
                self.config["backbone"],
                self.config["max_length"],
            )
        return cached

    def load_split(self, split: str) -> SplitArrays:
        frame = self.split_frame(split)
        missing = [name for name in IDENTITIES if name not in frame.columns]
        if missing:
            raise UserError(
                f"{self.metadata_file(self.data_dir)}: missing identity columns "
                f"{', '.join(missing)}; run `robustbench-mat prepare {self.name}` again"
            )
        rows = self.texts().index.get_indexer(frame["filename"])
        if (rows < 0).any():
            missing = frame["filename"].to_numpy()[rows < 0][:3].tolist()
            raise UserError(
                f"{self.prepared_files(self.data_dir)[1]} lacks comments of the metadata "
                f"({missing}); prepare the dataset again"
            )
        y = torch.as_tensor(frame["y"].to_numpy(copy=True), dtype=torch.long)
        a = torch.as_tensor(frame["a"].to_numpy(copy=True), dtype=torch.long)
        identities = torch.as_tensor(frame[list(IDENTITIES)].to_numpy(copy=True), dtype=torch.bool)
        per_identity = self.fine or split != "train"
        if not self.fine:
            if split == "train" and int(a.max()) > 1:
                raise UserError(
                    f"{self.metadata_file(self.data_dir)}: coarse train rows need a in {{0, 1}}"
                )
            identity_index = a.clone()
            if split != "train":
                a = torch.zeros_like(a)  # val/test rows all mention an identity
        else:
            identity_index = a
        if per_identity:  # each row stands for one (comment, identity) pair
            identities = torch.nn.functional.one_hot(identity_index, len(IDENTITIES)).bool()
        self._identities = getattr(self, "_identities", {})
        self._identities[split] = identities
        return SplitArrays(self.tokens()[torch.from_numpy(rows)], y, a)

    def eval_groups(self, split: str, y: torch.Tensor, a: torch.Tensor) -> EvalGroups:
        """The 16 WILDS groups (identity mentioned x label), overlapping in coarse train."""
        identities = self._identities[split]
        k = len(IDENTITIES)
        membership = torch.zeros(len(y), 2 * k, dtype=torch.bool)
        for label in (0, 1):
            membership[:, label * k : (label + 1) * k] = identities & (y == label)[:, None]
        return EvalGroups(EVAL_GROUP_NAMES, membership)


@register_dataset("civilcomments")
class CivilComments(_CivilComments):
    """CivilComments, coarse: y = toxicity >= 0.5, a = 1 when no identity is mentioned.

    The BalancingGroups/XRM "coarse" variant of WILDS v1.0 (`all_data_with_identities.csv`).
    Training keeps every train comment (269,038) with 4 training groups, label x {identity,
    no-identity}; note that a = 1 means no identity is mentioned. Val and test keep one row per
    (comment, identity mentioned) pair, so comments without identity are dropped and comments
    with several are repeated; their a is 0. Evaluation, in every split, uses the 16 WILDS
    groups (8 identities: male, female, LGBTQ, christian, muslim, other_religions, black, white,
    x 2 labels), overlapping in train. Text is tokenised with the backbone's tokenizer to 220
    tokens (`--data backbone=minilm max_length=...`).
    """

    fine = False
    n_attributes = 2
    attribute_names = ("identity", "no-identity")
    metadata_name = "civilcomments_coarse"


@register_dataset("civilcomments-fine")
class CivilCommentsFine(_CivilComments):
    """CivilComments, fine: one row per (comment, identity mentioned) in every split, a = identity.

    SubpopBench's CivilCommentsFine: training drops comments with no identity and repeats
    multi-identity ones (148,304 rows, label balance 82/18 vs 88/12 coarse), with 16 training
    groups (8 identities x 2 labels), which are also the evaluation groups.
    """

    fine = True
    n_attributes = len(IDENTITIES)
    attribute_names = IDENTITIES
    metadata_name = "civilcomments_fine"
