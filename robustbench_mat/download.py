"""Download, verify, extract and convert the upstream files of an on-disk dataset.

`download_dataset` fetches each `UpstreamFile` a dataset declares (with a progress bar, resuming
a partial `.part` file with an HTTP Range request), verifies its checksum where one is known,
extracts archives atomically (into a temporary sibling folder, then `os.replace` into place, so a
failure leaves no half-written dataset; a truncated or corrupt archive is deleted and the user
told to retry) and finally runs the dataset's conversion. `prepare_dataset` only converts, for
users who placed the upstream files by hand; the error of a failed download says which files to
place where.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from robustbench_mat.errors import UserError
from robustbench_mat.metadata import FileDataset, UpstreamFile, read_metadata, resolve_data_dir

CHUNK = 1 << 20
USER_AGENT = "robustbench-mat (+https://pypi.org/project/robustbench-mat)"


class DownloadError(Exception):
    """A file could not be fetched (host down, quota, HTTP error)."""


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def verify_checksum(path: Path, checksum: str | None) -> None:
    """Raise `UserError` (after deleting `path`) if its digest differs from `checksum`."""
    if checksum is None:
        return
    algorithm, _, expected = checksum.partition(":")
    actual = file_digest(path, algorithm)
    if actual != expected.lower():
        path.unlink(missing_ok=True)
        raise UserError(
            f"checksum mismatch for {path.name}: expected {algorithm} {expected}, got {actual}; "
            f"the file was deleted (a corrupt or changed download): run the command again to "
            f"retry"
        )


def fetch(
    url: str,
    destination: Path,
    checksum: str | None = None,
    show_progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download `url` to `destination`, resuming `<destination>.part` if a previous attempt left
    one; the file appears under its final name only once complete and verified."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    have = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # the partial file is already complete
            response = None
        else:
            raise DownloadError(f"HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(str(reason)) from None
    if response is not None:
        with response:
            status = getattr(response, "status", None) or 200
            if have and status != 206:  # the server ignored the Range header: start over
                have = 0
            content_type = response.headers.get("Content-Type", "") or ""
            if content_type.startswith("text/html") and not url.endswith((".html", ".htm")):
                raise DownloadError(
                    "the server sent a web page instead of the file (a Google Drive quota or "
                    "sign-in page, or a host outage)"
                )
            length = response.headers.get("Content-Length")
            total = have + int(length) if length and length.isdigit() else None
            bar = tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=destination.name,
                disable=not show_progress,
                dynamic_ncols=True,
            )
            try:
                with open(partial, "ab" if have else "wb") as out:
                    while block := response.read(CHUNK):
                        out.write(block)
                        bar.update(len(block))
            except (OSError, urllib.error.URLError) as error:
                raise DownloadError(f"interrupted: {error}") from None
            finally:
                bar.close()
            if total is not None and partial.stat().st_size < total:
                raise DownloadError(f"interrupted after {partial.stat().st_size} of {total} bytes")
    verify_checksum(partial, checksum)
    os.replace(partial, destination)
    return destination


def _safe_members(archive: tarfile.TarFile, target: Path) -> None:
    root = target.resolve()
    for member in archive.getmembers():
        path = (target / member.name).resolve()
        if root not in path.parents and path != root:
            raise tarfile.TarError(f"unsafe path {member.name!r} in the archive")
        if member.issym() or member.islnk():
            raise tarfile.TarError(f"link {member.name!r} in the archive")


def extract_archive(archive: Path, target: Path) -> list[Path]:
    """Unpack `archive` (tar, tar.gz or zip) into `target`, atomically per top-level entry.

    Everything is first extracted into a temporary sibling folder; only a complete extraction is
    moved into place. A truncated or corrupt archive is deleted and reported as a `UserError`
    telling the user to retry."""
    target.mkdir(parents=True, exist_ok=True)
    staging = target / f".extracting-{archive.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as bundle:
                for name in bundle.namelist():
                    resolved = (staging / name).resolve()
                    if staging.resolve() not in resolved.parents:
                        raise zipfile.BadZipFile(f"unsafe path {name!r} in the archive")
                bundle.extractall(staging)
        else:
            with tarfile.open(archive) as bundle:
                _safe_members(bundle, staging)
                bundle.extractall(staging)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        archive.unlink(missing_ok=True)
        raise UserError(
            f"{archive} is truncated or corrupt ({error}); it was deleted: run the command again "
            f"to download it anew"
        ) from None
    placed = []
    for entry in sorted(staging.iterdir()):
        final = target / entry.name
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists():
            final.unlink()
        os.replace(entry, final)
        placed.append(final)
    staging.rmdir()
    return placed


def _in_place(root: Path, item: UpstreamFile) -> bool:
    return all(any(root.glob(pattern)) for pattern in item.provides)


def manual_instructions(cls: type[FileDataset], data_dir: str | Path | None) -> str:
    """Which files to place where, for a user whose download failed."""
    root = cls.dataset_root(data_dir)
    lines = []
    for item in cls.upstream:
        if _in_place(root, item):
            continue
        what = ", ".join(str(root / p) for p in item.provides)
        how = f"download {item.url} to {root / item.filename}"
        if item.extract:
            how += " (it is extracted for you)"
        lines.append(f"{how}, or place {what} yourself" + (f" ({item.note})" if item.note else ""))
    command = f"robustbench-mat prepare {cls.name} --data-dir {resolve_data_dir(data_dir)}"
    return "; ".join(lines) + f"; then run `{command}`"


def _place(root: Path, item: UpstreamFile) -> bool:
    """Make `item` available in `root` from a local copy (extracting an archive placed by hand);
    True when its paths exist."""
    if _in_place(root, item):
        return True
    local = root / item.filename
    if local.exists():
        verify_checksum(local, item.checksum)
        if item.extract:
            extract_archive(local, root / item.extract_to)
            local.unlink(missing_ok=True)
    return _in_place(root, item)


def prepare_dataset(
    cls: type[FileDataset], data_dir: str | Path | None, show_progress: bool = True
) -> list[Path]:
    """Convert the upstream files already in `<data_dir>/<folder>` (no network)."""
    root = cls.dataset_root(data_dir)
    missing = [item for item in cls.upstream if not _place(root, item)]
    if missing:
        raise UserError(
            f"dataset {cls.name}: upstream files missing in {root}: "
            + manual_instructions(cls, data_dir)
        )
    if show_progress:
        print(f"converting {cls.name} in {root}", flush=True)
    written = cls.convert(root)
    for path in written:  # report a bad value now, not at the first run
        if path.name.startswith("metadata_"):
            read_metadata(path, cls.n_classes, None)
    return written


def download_dataset(
    cls: type[FileDataset], data_dir: str | Path | None, show_progress: bool = True
) -> list[Path]:
    """Fetch the upstream files that are not in place yet, then `prepare_dataset`."""
    root = cls.dataset_root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    for item in cls.upstream:
        if _place(root, item):
            continue
        try:
            fetch(item.url, root / item.filename, item.checksum, show_progress)
        except DownloadError as error:
            raise UserError(
                f"could not download {item.url} ({error}). Partial downloads are kept and "
                f"resumed if you run the command again. To set the dataset up by hand: "
                + manual_instructions(cls, data_dir)
            ) from None
        if not _place(root, item):
            raise UserError(
                f"{root / item.filename} did not provide {', '.join(item.provides)}; "
                + manual_instructions(cls, data_dir)
            )
    return prepare_dataset(cls, data_dir, show_progress)


def dataset_class(name: str) -> type[FileDataset]:
    """The registered on-disk dataset `name` (UserError for in-memory ones)."""
    from robustbench_mat.registry import DATASETS

    cls = DATASETS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, FileDataset)):
        on_disk = [p.name for p in DATASETS if issubclass(p.cls, FileDataset)]
        raise UserError(
            f"dataset {cls.name!r} is generated in memory and needs no download; datasets with "
            f"files: {', '.join(on_disk)}"
        )
    return cls
