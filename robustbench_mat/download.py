"""Download, verify, extract and convert the upstream files of an on-disk dataset.

`download_dataset` fetches each `UpstreamFile` a dataset declares, from its address or else from
its mirrors in turn: with a progress bar, resuming a partial `.part` file with an HTTP Range
request, and passing Google Drive's "cannot scan for viruses" page for large files (a quota page
is reported as such). It verifies the published checksums where they are known, extracts archives
atomically (into a temporary sibling folder, then `os.replace` into place, so a failure leaves no
half-written dataset) and safely (no member outside the folder, no links or device files, no
setuid bits), and finally runs the dataset's conversion. A downloaded archive is deleted once
extracted; a truncated or corrupt one is deleted and the user told to retry. An archive placed by
hand is never deleted, and neither is one whose extraction failed for another reason (a full
disk). Before fetching anything, `download_dataset` prints each file's declared size and the free
disk, and refuses a download that cannot fit; a response whose Content-Length exceeds the free
disk is refused before a byte is written. `prepare_dataset` only converts, for users
who placed the upstream files by hand (checked against the same checksums); the error of a failed
download says which files to place where."""

from __future__ import annotations

import errno
import gzip
import hashlib
import lzma
import os
import platform
import shutil
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import urlencode, urljoin

from tqdm.auto import tqdm

from robustbench_mat.errors import UserError
from robustbench_mat.metadata import (
    FileDataset,
    UpstreamFile,
    format_bytes,
    read_metadata,
    resolve_data_dir,
)

CHUNK = 1 << 20
PAGE_LIMIT = 1 << 20  # bytes of a web page read to look for a confirmation link
USER_AGENT = "robustbench-mat (+https://pypi.org/project/robustbench-mat)"


class DownloadError(Exception):
    """A file could not be fetched (host down, quota, HTTP error, wrong checksum)."""


class NotEnoughSpace(UserError):
    """The free disk is below what a download needs; raised before anything is written."""


def free_space(path: Path) -> int:
    """The bytes free on the file system of `path` (of its nearest existing parent, if none)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def space_message(what: str, target: Path, needed: int, free: int, exact: bool = True) -> str:
    """Why downloading `what` into `target` is refused, and how to fix it."""
    at_least = "" if exact else "at least "
    return (
        f"not enough free space to download {what} into {target}: it needs {at_least}"
        f"{format_bytes(needed)} and {format_bytes(free)} is free there. Free {at_least}"
        f"{format_bytes(needed - free)} on that file system, or pass --data-dir with a folder on "
        f"a disk with more space; nothing was downloaded"
    )


def google_drive_url(file_id: str) -> str:
    """The direct-download address of a public Google Drive file."""
    return f"https://drive.google.com/uc?export=download&id={file_id}"


def digests(path: Path, algorithms: set[str]) -> dict[str, str]:
    """The hex digests of `path` for each of `algorithms`, in one pass over the file."""
    hashers = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            for hasher in hashers.values():
                hasher.update(block)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def checksum_problem(path: Path, checksums: tuple[str, ...]) -> str | None:
    """None if `path` matches one of `checksums` (or none is declared), else what differs."""
    if not checksums:
        return None
    expected = [checksum.partition(":")[::2] for checksum in checksums]
    actual = digests(path, {algorithm for algorithm, _ in expected})
    if any(actual[algorithm] == digest.lower() for algorithm, digest in expected):
        return None
    known = " or ".join(f"{algorithm} {digest}" for algorithm, digest in expected)
    got = ", ".join(f"{algorithm} {digest}" for algorithm, digest in sorted(actual.items()))
    return f"checksum mismatch for {path.name}: expected {known}, got {got}"


class _ConfirmPage(HTMLParser):
    """Reads Google Drive's "cannot scan this file for viruses" page, which large files get
    instead of their content: the `download-form` form (its action and fields) or, on older
    pages, the `uc-download-link` anchor lead to the file."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self.link: str | None = None
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "form" and attributes.get("id") == "download-form":
            self.action, self._in_form = attributes.get("action"), True
        elif tag == "input" and self._in_form and attributes.get("name"):
            self.fields[str(attributes["name"])] = attributes.get("value") or ""
        elif tag == "a" and attributes.get("id") == "uc-download-link":
            self.link = attributes.get("href")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def drive_confirmation_url(page: str, page_url: str) -> str | None:
    """The address past a Google Drive confirmation page, or None if `page` is not one."""
    parser = _ConfirmPage()
    parser.feed(page)
    if parser.action:
        return urljoin(page_url, parser.action) + "?" + urlencode(parser.fields)
    if parser.link:
        return urljoin(page_url, parser.link)
    return None


def _page_problem(page: str) -> str:
    if "too many users" in page.lower() or "quota" in page.lower():
        return (
            "Google Drive refuses the file for now (its download quota is exceeded; it resets "
            "within 24 hours)"
        )
    return "the server sent a web page instead of the file (a sign-in page or a host outage)"


class _Fetch:
    """One download into `<destination>.part`, resuming it with an HTTP Range request."""

    def __init__(self, destination: Path, show_progress: bool, timeout: float) -> None:
        self.destination = destination
        self.partial = destination.with_name(destination.name + ".part")
        self.show_progress = show_progress
        self.timeout = timeout
        # Cookies carry Google Drive's confirmation from its warning page to the file.
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())

    def open(self, url: str) -> tuple[Any, int]:
        """(response, bytes already on disk); response None when the part is already whole."""
        have = self.partial.stat().st_size if self.partial.exists() else 0
        headers = {"User-Agent": USER_AGENT}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            response = self.opener.open(
                urllib.request.Request(url, headers=headers), timeout=self.timeout
            )
        except urllib.error.HTTPError as error:
            if error.code == 416 and have:  # the partial file is already complete
                return None, have
            raise DownloadError(f"HTTP {error.code} {error.reason}") from None
        except (urllib.error.URLError, OSError) as error:
            raise DownloadError(str(getattr(error, "reason", error))) from None
        status = getattr(response, "status", None) or 200
        return response, have if status == 206 else 0  # a 200 ignored the Range: start over

    def open_file(self, url: str) -> tuple[Any, int]:
        """Like `open`, but past Google Drive's confirmation page; any other page is an error."""
        for _ in range(3):
            response, have = self.open(url)
            if response is None or not _is_page(response, url):
                return response, have
            with response:
                page = response.read(PAGE_LIMIT).decode("utf-8", "replace")
                page_url = response.geturl()
            url = drive_confirmation_url(page, page_url)
            if url is None:
                raise DownloadError(_page_problem(page))
        raise DownloadError("Google Drive answered with confirmation pages only")

    def ensure_space(self, response: Any, have: int) -> None:
        """Refuse a response whose Content-Length exceeds the free disk, before writing a byte."""
        length = response.headers.get("Content-Length")
        if not (length and length.isdigit()):
            return
        free = free_space(self.partial.parent)
        if not have and self.partial.exists():  # started over: the partial file is replaced
            free += self.partial.stat().st_size
        if int(length) > free:
            response.close()
            folder = self.partial.parent
            raise NotEnoughSpace(space_message(self.destination.name, folder, int(length), free))

    def write(self, response: Any, have: int) -> None:
        self.ensure_space(response, have)
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        bar = tqdm(
            total=total,
            initial=have,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=self.destination.name,
            disable=not self.show_progress,
            dynamic_ncols=True,
        )
        try:
            with response, open(self.partial, "ab" if have else "wb") as out:
                while block := response.read(CHUNK):
                    out.write(block)
                    bar.update(len(block))
        except (OSError, urllib.error.URLError) as error:
            raise DownloadError(f"interrupted: {error}") from None
        finally:
            bar.close()
        if total is not None and self.partial.stat().st_size < total:
            raise DownloadError(f"interrupted after {self.partial.stat().st_size} of {total} bytes")


def _is_page(response: Any, url: str) -> bool:
    content_type = response.headers.get("Content-Type", "") or ""
    return content_type.startswith("text/html") and not url.endswith((".html", ".htm"))


def fetch(
    url: str,
    destination: Path,
    checksums: tuple[str, ...] = (),
    show_progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download `url` to `destination`, resuming `<destination>.part` if a previous attempt left
    one and passing Google Drive's confirmation page; the file appears under its final name only
    once complete and matching one of `checksums`. A mismatching download is deleted. A response
    whose Content-Length exceeds the free disk raises `NotEnoughSpace` before anything is
    written."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    download = _Fetch(destination, show_progress, timeout)
    # A partial file is resumed only from the address that started it: a mirror's bytes may differ.
    source = download.partial.with_name(download.partial.name + ".url")
    if source.exists() and source.read_text() != url:
        download.partial.unlink(missing_ok=True)
    source.write_text(url)
    try:
        response, have = download.open_file(url)
        if response is not None:
            download.write(response, have)
    except NotEnoughSpace:
        if not download.partial.exists():
            source.unlink()
        raise
    problem = checksum_problem(download.partial, checksums)
    if problem:
        download.partial.unlink(missing_ok=True)
        source.unlink()
        raise DownloadError(f"{problem} (a corrupt or changed download; it was deleted)")
    os.replace(download.partial, destination)
    source.unlink()
    return destination


# What reading a damaged archive raises: the archive is at fault, not the disk or permissions.
CORRUPT_ARCHIVE_ERRORS = (
    tarfile.ReadError,
    tarfile.CompressionError,
    tarfile.HeaderError,
    zipfile.BadZipFile,  # also a bad CRC-32
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    lzma.LZMAError,
)
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class _RefusedMember(Exception):
    """An archive member that must not be extracted (outside the folder, a link, a device)."""


def _path_problem(name: str) -> str | None:
    """Why archive member `name` would land outside the extraction folder, or None."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or PureWindowsPath(name).drive:
        return f"member {name!r} has an absolute path"
    if ".." in path.parts:
        return f"member {name!r} has a '..' component"
    return None


def _tar_member_problem(member: tarfile.TarInfo) -> str | None:
    """Why `member` may not be extracted, or None for a file or folder inside the archive.

    Links are refused outright, not only those pointing outside: dataset archives hold none, and
    the bypasses of tarfile's "data" filter fixed in Python 3.10.18/3.11.13/3.12.11/3.13.4
    (CVE-2025-4517 and others) go through links."""
    if member.issym():
        return f"member {member.name!r} is a symbolic link"
    if member.islnk():
        return f"member {member.name!r} is a hard link"
    if not (member.isfile() or member.isdir()):
        return f"member {member.name!r} is a device, FIFO or other special file"
    return _path_problem(member.name)


def _zip_member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why `info` may not be extracted, or None. zipfile never creates links or devices nor
    restores permission bits; a symbolic link would be written as a file holding its target."""
    if stat.S_ISLNK(info.external_attr >> 16):
        return f"member {info.filename!r} is a symbolic link"
    return _path_problem(info.filename)


def _unpack_tar(archive: Path, staging: Path) -> None:
    with tarfile.open(archive) as bundle:
        members = bundle.getmembers()
        for member in members:
            if problem := _tar_member_problem(member):
                raise _RefusedMember(problem)
        try:
            # "data" also drops setuid/setgid bits and the archive's owners.
            bundle.extractall(staging, members=members, filter="data")
        except tarfile.FilterError as error:
            raise _RefusedMember(str(error)) from None


def _unpack_zip(archive: Path, staging: Path) -> None:
    with zipfile.ZipFile(archive) as bundle:
        for info in bundle.infolist():
            if problem := _zip_member_problem(info):
                raise _RefusedMember(problem)
        bundle.extractall(staging)


def _unpack(archive: Path, staging: Path) -> None:
    """Extract `archive` into the new folder `staging`, which is removed if anything fails."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        if zipfile.is_zipfile(archive):
            _unpack_zip(archive, staging)
        else:
            _unpack_tar(archive, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _unpacked_size(archive: Path) -> int | None:
    """The total size of the files in `archive`, or None if it cannot be read."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as bundle:
                return sum(info.file_size for info in bundle.infolist())
        with tarfile.open(archive) as bundle:
            return sum(member.size for member in bundle if member.isfile())
    except (*CORRUPT_ARCHIVE_ERRORS, tarfile.TarError, OSError):
        return None


def _size(n_bytes: int) -> str:
    return tqdm.format_sizeof(n_bytes, "B", 1024)


def _no_space_message(archive: Path, target: Path) -> str:
    free = shutil.disk_usage(target).free
    size = _unpacked_size(archive)
    unpacked = "an unknown size" if size is None else _size(size)
    needed = f"at least {_size(size - free)}" if size is not None and size > free else "space"
    return (
        f"no space left on device while extracting {archive} into {target} (it unpacks to "
        f"{unpacked}; {_size(free)} is free there): free {needed} on the file system of {target} "
        f"and run the command again; the archive was kept and nothing was extracted"
    )


def extract_archive(archive: Path, target: Path, downloaded: bool = False) -> list[Path]:
    """Unpack `archive` (tar, tar.gz or zip) into `target`, atomically per top-level entry.

    Everything is first extracted into a temporary folder inside `target`; only a complete
    extraction is moved into place. Members outside `target`, links and special files are
    refused; setuid/setgid bits and owners are not restored. A tar needs tarfile's extraction
    filters (Python 3.10.12, 3.11.4, 3.12 or later), else it is refused with a `UserError`.
    A truncated or corrupt archive is deleted only if the tool `downloaded` it itself; any other
    failure, a full disk included, keeps the archive. Failures are reported as a `UserError`."""
    if not zipfile.is_zipfile(archive) and not hasattr(tarfile, "data_filter"):
        raise UserError(
            f"extracting {archive} safely needs tarfile's extraction filters (Python 3.10.12, "
            f"3.11.4, 3.12 or later; this is Python {platform.python_version()}): upgrade "
            f"Python, or extract it into {target} yourself and run the command again"
        )
    target.mkdir(parents=True, exist_ok=True)
    staging = target / f".extracting-{archive.name}-{os.getpid()}"
    try:
        _unpack(archive, staging)
    except _RefusedMember as refusal:
        raise UserError(
            f"refusing to extract {archive}: {refusal} (a dataset archive holds only files and "
            f"folders inside it); it is not the published archive: delete it and download the "
            f"dataset from its publisher"
        ) from None
    except CORRUPT_ARCHIVE_ERRORS as error:
        if downloaded:
            archive.unlink(missing_ok=True)
            raise UserError(
                f"{archive} is truncated or corrupt ({error}); it was deleted: run the command "
                f"again to download it anew"
            ) from None
        raise UserError(
            f"{archive} is truncated or corrupt ({error}); it was kept, as it was placed by "
            f"hand: replace it with a good copy, or delete it and run `robustbench-mat download` "
            f"to fetch it"
        ) from None
    except OSError as error:
        if error.errno in NO_SPACE_ERRNOS:
            raise UserError(_no_space_message(archive, target)) from None
        raise UserError(
            f"could not extract {archive} into {target} ({error}); the archive was kept and "
            f"nothing was extracted: fix the cause and run the command again"
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
        how = f"download {' or '.join(item.urls)} to {root / item.filename}"
        if item.extract:
            how += " (it is extracted for you)"
        lines.append(f"{how}, or place {what} yourself" + (f" ({item.note})" if item.note else ""))
    command = f"robustbench-mat prepare {cls.name} --data-dir {resolve_data_dir(data_dir)}"
    return "; ".join(lines) + f"; then run `{command}`"


def _place(
    cls: type[FileDataset], root: Path, item: UpstreamFile, verify: bool, downloaded: bool = False
) -> bool:
    """Make `item` available in `root` from a local copy (extracting an archive placed by hand,
    or one just `downloaded`); True when its paths exist. A file placed by hand is checked
    against the published checksums like a download."""
    if item.extract and _in_place(root, item):
        return True
    local = root / item.filename
    if local.is_file():
        problem = checksum_problem(local, item.checksums) if verify else None
        if problem:
            raise UserError(
                f"{problem}: {local} is not the published file. Delete it and run "
                f"`robustbench-mat download {cls.name}` to fetch it anew, or, if it is a copy "
                f"you trust (a re-packed mirror), pass --skip-checksum"
            )
        if item.extract:
            extract_archive(local, root / item.extract_to, downloaded)
            if downloaded:  # a copy placed by hand is the user's: never deleted
                local.unlink(missing_ok=True)
    return _in_place(root, item)


def prepare_dataset(
    cls: type[FileDataset],
    data_dir: str | Path | None,
    show_progress: bool = True,
    verify: bool = True,
) -> list[Path]:
    """Convert the upstream files already in `<data_dir>/<folder>` (no network); `verify=False`
    accepts files whose checksum differs from the published ones."""
    root = cls.dataset_root(data_dir)
    missing = [item for item in cls.upstream if not _place(cls, root, item, verify)]
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


def _download(item: UpstreamFile, root: Path, show_progress: bool, verify: bool) -> list[str]:
    """Fetch `item` from its address, else from each mirror in turn; the failures, if all fail."""
    failures = []
    for url in item.urls:
        try:
            fetch(url, root / item.filename, item.checksums if verify else (), show_progress)
        except DownloadError as error:
            failures.append(f"{url}: {error}")
            continue
        return []
    return failures


def _to_fetch(root: Path, item: UpstreamFile) -> int | None:
    """The bytes of `item` still to download (less a partial download on disk), or None."""
    if item.size is None:
        return None
    partial = root / (item.filename + ".part")
    return max(item.size - (partial.stat().st_size if partial.is_file() else 0), 0)


def space_needed(root: Path, items: list[UpstreamFile]) -> tuple[int, bool]:
    """(the most disk the downloads of `items` take at once, whether every size is known).

    Files are fetched in turn; an archive is extracted beside itself, then deleted, so its peak
    is the files kept so far plus the archive plus its unpacked files."""
    kept = peak = 0
    known = True
    for item in items:
        download = _to_fetch(root, item)
        unpacked = item.unpacked_size if item.extract else 0
        known = known and download is not None and unpacked is not None
        peak = max(peak, kept + (download or 0) + (unpacked or 0))
        kept += (unpacked or 0) if item.extract else (download or 0)
    return peak, known


def _describe(item: UpstreamFile) -> str:
    """'  name: 1.34 GiB (an archive: unpacked size unknown; deleted once extracted)'."""
    size = "size unknown" if item.size is None else format_bytes(item.size)
    if not item.extract:
        return f"  {item.filename}: {size}"
    unpacked = (
        "unpacked size unknown"
        if item.unpacked_size is None
        else f"unpacks to {format_bytes(item.unpacked_size)}"
    )
    return f"  {item.filename}: {size} (an archive: {unpacked}; deleted once extracted)"


def _needed(needed: int, known: bool) -> str:
    if known:
        return format_bytes(needed)
    return f"at least {format_bytes(needed)} (some sizes are unknown)" if needed else "unknown"


def check_space(
    cls: type[FileDataset], root: Path, items: list[UpstreamFile], show_progress: bool
) -> None:
    """Print the size of each of `items` and the free disk; refuse if it is too little."""
    needed, known = space_needed(root, items)
    free = free_space(root)
    if show_progress:
        lines = [f"downloading {cls.name} into {root}:", *map(_describe, items)]
        lines.append(f"  needed: {_needed(needed, known)}; free there: {format_bytes(free)}")
        print("\n".join(lines), flush=True)
    if needed > free:
        raise NotEnoughSpace(space_message(cls.name, root, needed, free, exact=known))


def download_dataset(
    cls: type[FileDataset],
    data_dir: str | Path | None,
    show_progress: bool = True,
    verify: bool = True,
) -> list[Path]:
    """Fetch the upstream files that are not in place yet, then `prepare_dataset`. Their sizes
    and the free disk are printed first, and a download that cannot fit is refused."""
    root = cls.dataset_root(data_dir)
    pending = [item for item in cls.upstream if not _place(cls, root, item, verify)]
    if pending:
        check_space(cls, root, pending, show_progress)
    root.mkdir(parents=True, exist_ok=True)
    for item in pending:
        failures = _download(item, root, show_progress, verify)
        if failures:
            raise UserError(
                f"could not download {item.filename} ({'; '.join(failures)}). Partial downloads "
                f"are kept and resumed if you run the command again. To set the dataset up by "
                f"hand: " + manual_instructions(cls, data_dir)
            )
        if not _place(cls, root, item, verify=False, downloaded=True):  # `fetch` verified it
            raise UserError(
                f"{root / item.filename} did not provide {', '.join(item.provides)}; "
                + manual_instructions(cls, data_dir)
            )
    return prepare_dataset(cls, data_dir, show_progress, verify)


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
