"""Datasets that live on disk: the data directory, the canonical metadata table, and the base
class of the real benchmarks (Waterbirds, CelebA, MultiNLI, CivilComments).

Every on-disk dataset is converted once (`robustbench-mat prepare`, see
`robustbench_mat.download`) into `<data_dir>/<folder>/metadata_<name>.csv` with the columns
`id,filename,split,y,a`, split being 0 (train), 1 (val) or 2 (test). Loaders read that table
through `read_metadata`, which names the file and the row of any bad value, and never touch the
network.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from robustbench_mat.data import BenchmarkDataset
from robustbench_mat.errors import UserError

if TYPE_CHECKING:  # pandas is imported where a table is read or written, not by `list`
    import pandas as pd

METADATA_COLUMNS = ("id", "filename", "split", "y", "a")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
DATA_ENV = "ROBUSTBENCH_MAT_DATA"
# A filename that leaves the folder it is joined to: absolute (`/x`, `\x`, `C:x`) or with a
# `..` component (between `/` or `\` separators).
OUTSIDE_FOLDER = r"^(?:[/\\]|[A-Za-z]:)|(?:^|[/\\])\.\.(?:[/\\]|$)"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """`data_dir`, else `$ROBUSTBENCH_MAT_DATA`, else `./data`."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    return Path(os.environ.get(DATA_ENV) or "data").expanduser()


@dataclass(frozen=True)
class UpstreamFile:
    """One file a dataset is built from, as its authors publish it.

    `filename` is where the download is stored (relative to the dataset's folder). `url` is
    tried first, then each of `mirrors` (copies of the same file elsewhere, e.g. on Google
    Drive). An archive (`extract=True`) is unpacked into `extract_to` (relative to the dataset's
    folder) and then deleted. `provides` lists the paths or glob patterns (relative to the
    folder) that exist once the file is in place, extracted if needed: `prepare` checks them.
    `checksums` are the digests a good copy may have (`sha256:<hex>` or `md5:<hex>`; any one
    matching is enough), declared only where the upstream file is stable and its digest is
    published; empty means unverified. `size` is the file's size in bytes and `unpacked_size`
    the total size of an archive's files, declared only where documented; None means unknown.
    """

    url: str
    filename: str
    provides: tuple[str, ...]
    checksums: tuple[str, ...] = ()
    extract: bool = False
    note: str = ""
    extract_to: str = "."
    mirrors: tuple[str, ...] = ()
    size: int | None = None
    unpacked_size: int | None = None

    def __post_init__(self) -> None:
        for checksum in self.checksums:
            algorithm, _, digest = checksum.partition(":")
            size = CHECKSUM_HEX_LENGTHS.get(algorithm)
            if size is None or len(digest) != size or not _is_hex(digest):
                raise ValueError(
                    f"{self.filename}: checksum {checksum!r} is not 'sha256:<64 hex>' or "
                    f"'md5:<32 hex>'"
                )

    @property
    def urls(self) -> tuple[str, ...]:
        return (self.url, *self.mirrors)


CHECKSUM_HEX_LENGTHS = {"sha256": 64, "md5": 32}


def format_bytes(n_bytes: int) -> str:
    """`n_bytes` in binary units, e.g. '1.34 GiB', '512 B'."""
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.3g} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def declared_download_size(upstream: tuple[UpstreamFile, ...]) -> str:
    """The total declared size of `upstream`, e.g. '1.37 GiB in 3 files' or 'size unknown'."""
    known = [item.size for item in upstream if item.size is not None]
    count = f"{len(upstream)} file{'s' if len(upstream) > 1 else ''}"
    if not known:
        return f"size unknown ({count})"
    unknown = len(upstream) - len(known)
    more = f", {unknown} of them of unknown size" if unknown else ""
    return f"{'at least ' if unknown else ''}{format_bytes(sum(known))} in {count}{more}"


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


def _line(index: int) -> int:
    """The file line of data row `index` (line 1 is the header)."""
    return int(index) + 2


def read_metadata(
    path: Path,
    n_classes: int | None = None,
    n_attributes: int | None = None,
    columns: tuple[str, ...] = METADATA_COLUMNS,
) -> pd.DataFrame:
    """The metadata table at `path`, validated: every column present, split in {0, 1, 2}, y and
    a integers in range, filenames non-empty and inside the dataset folder. Any problem raises
    `UserError` naming the file and the line."""
    import pandas as pd  # here, not when `list` imports the plugin

    try:
        frame = pd.read_csv(path, dtype={"filename": str}, keep_default_na=False)
    except FileNotFoundError:
        raise UserError(f"metadata file {path} does not exist") from None
    except pd.errors.ParserError as error:
        raise UserError(f"{path}: unreadable row: {str(error).strip()}") from None
    except (UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise UserError(f"{path}: not a readable CSV file ({error})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(
            f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(expected {','.join(columns)}; found {','.join(map(str, frame.columns))})"
        )
    limits = {"split": 3, "y": n_classes, "a": n_attributes}
    for column in ("split", "y", "a"):
        if column not in columns:
            continue
        raw = frame[column]
        values = pd.to_numeric(raw, errors="coerce")
        bad = values.isna() | (values != np.floor(values)) | (values < 0)
        if limits[column] is not None:
            bad |= values >= limits[column]
        if bad.any():
            first = int(np.flatnonzero(bad.to_numpy())[0])
            allowed = (
                "0 (train), 1 (val) or 2 (test)"
                if column == "split"
                else f"an integer in 0..{limits[column] - 1}"
                if limits[column] is not None
                else "a non-negative integer"
            )
            raise UserError(
                f"{path}, line {_line(first)}: bad {column} value {str(raw.iloc[first])!r}; "
                f"expected "
                f"{allowed} ({int(bad.sum())} bad row{'s' if bad.sum() > 1 else ''} in all)"
            )
        frame[column] = values.astype(np.int8 if column != "a" or not n_attributes else np.int16)
    if "filename" in columns:
        empty = frame["filename"].str.len() == 0
        if empty.any():
            first = int(np.flatnonzero(empty.to_numpy())[0])
            raise UserError(f"{path}, line {_line(first)}: empty filename")
        outside = frame["filename"].str.contains(OUTSIDE_FOLDER, regex=True)
        if outside.any():
            first = int(np.flatnonzero(outside.to_numpy())[0])
            raise UserError(
                f"{path}, line {_line(first)}: filename {frame['filename'].iloc[first]!r} "
                f"points outside the dataset folder (an absolute path or a '..' component; "
                f"{int(outside.sum())} such row{'s' if outside.sum() > 1 else ''} in all); "
                f"prepare the dataset again from its published files"
            )
    return frame


def file_fingerprint(path: Path) -> str:
    """A short sha256 of a file's bytes (keys caches derived from it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:16]


def write_table(frame: pd.DataFrame, path: Path, index: bool = False) -> None:
    """Write a CSV atomically: a crash leaves the old file or none, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=index)
    os.replace(tmp, path)


def require_columns(frame: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> None:
    """Raise `UserError` naming the upstream file when it lacks a column a conversion needs."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(
            f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
            f"is it the upstream file?"
        )


class FileDataset(BenchmarkDataset):
    """A benchmark read from `<data_dir>/<folder>/`, converted from its upstream files.

    A subclass declares `folder`, `upstream` (the files to download, see `UpstreamFile`) and
    `convert(root)`, which reads the upstream files in `root` and writes
    `metadata_<metadata_name>.csv` (and whatever else the loader reads) with `write_table`.
    """

    folder: ClassVar[str] = ""
    metadata_name: ClassVar[str] = ""
    upstream: ClassVar[tuple[UpstreamFile, ...]] = ()
    manual_note: ClassVar[str] = ""

    @classmethod
    def dataset_root(cls, data_dir: str | Path | None) -> Path:
        return resolve_data_dir(data_dir) / cls.folder

    @classmethod
    def metadata_file(cls, data_dir: str | Path | None) -> Path:
        return cls.dataset_root(data_dir) / f"metadata_{cls.metadata_name or cls.name}.csv"

    @classmethod
    def convert(cls, root: Path) -> list[Path]:
        """Write the canonical files from the upstream ones in `root`; return what it wrote."""
        raise NotImplementedError

    @classmethod
    def prepared_files(cls, data_dir: str | Path | None) -> list[Path]:
        """The files `convert` writes (all must exist for the dataset to load)."""
        return [cls.metadata_file(data_dir)]

    @property
    def root(self) -> Path:
        return self.dataset_root(self.data_dir)

    def missing_data_error(self, path: Path) -> UserError:
        data_dir = resolve_data_dir(self.data_dir)
        return UserError(
            f"dataset {self.name}: {path} not found; run `robustbench-mat download {self.name} "
            f"--data-dir {data_dir}` (or, with the upstream files placed by hand in "
            f"{self.root}, `robustbench-mat prepare {self.name} --data-dir {data_dir}`)"
        )

    def require(self, path: Path) -> Path:
        if not path.exists():
            raise self.missing_data_error(path)
        return path

    def metadata(self) -> pd.DataFrame:
        """The validated metadata table, read once."""
        cached = getattr(self, "_metadata", None)
        if cached is None:
            path = self.require(self.metadata_file(self.data_dir))
            cached = read_metadata(path, self.n_classes, self.metadata_attribute_limit())
            self._metadata = cached
        return cached

    def metadata_attribute_limit(self) -> int | None:
        return self.n_attributes

    def split_frame(self, split: str) -> pd.DataFrame:
        frame = self.metadata()
        part = frame[frame["split"] == SPLIT_CODES[split]]
        if len(part) == 0:
            raise UserError(
                f"dataset {self.name}: {self.metadata_file(self.data_dir)} has no {split} rows "
                f"(split = {SPLIT_CODES[split]}); prepare the dataset again"
            )
        return part.reset_index(drop=True)
