"""Download, resume, checksum, atomic extraction and the prepare/download commands, against a
local HTTP server on 127.0.0.1 (never the network)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import http.server
import shutil
import tarfile
import threading
import urllib.parse
import zipfile
from pathlib import Path

import pytest
from upstream_fixtures import tar_folder, write_waterbirds

from robustbench_mat.cli import main
from robustbench_mat.datasets.waterbirds import Waterbirds
from robustbench_mat.download import (
    DownloadError,
    NotEnoughSpace,
    dataset_class,
    download_dataset,
    extract_archive,
    fetch,
    prepare_dataset,
    space_needed,
)
from robustbench_mat.errors import UserError
from robustbench_mat.metadata import UpstreamFile, declared_download_size, format_bytes


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the files of a folder, honouring `Range: bytes=N-`; logs the Range headers."""

    ranges: list[str | None] = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        address = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(address.query))
        if address.path == "/uc" and "confirm" not in query:
            self._page(_drive_page(query["id"], f"http://{self.headers['Host']}"))
            return
        if address.path in ("/uc", "/download"):  # past the confirmation: the file `id`
            if query.get("confirm") not in ("t", "AbCd"):
                self.send_error(403)
                return
            self.path = "/" + query["id"]
        path = Path(self.translate_path(self.path))
        if path.name == "page.bin":
            self._page("<html>sign in</html>")
            return
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        requested = self.headers.get("Range")
        type(self).ranges.append(requested)
        start = int(requested.split("=")[1].rstrip("-")) if requested else 0
        if start >= len(data) and requested:
            self.send_error(416)
            return
        self.send_response(206 if requested else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def _page(self, text: str) -> None:
        body = text.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _drive_page(file_id: str, base: str) -> str:
    """Google Drive's answer to the address of a large file (or of one over its quota)."""
    if file_id.startswith("quota"):
        return (
            "<html><head><title>Google Drive - Quota exceeded</title></head><body><p>Too many "
            "users have viewed or downloaded this file recently.</p></body></html>"
        )
    if file_id.startswith("old"):  # the anchor of the pages before 2024
        return (
            '<html><body><a id="uc-download-link" class="goog-inline-block jfk-button" '
            f'href="/uc?export=download&amp;confirm=AbCd&amp;id={file_id}">Download anyway</a>'
            "</body></html>"
        )
    return (
        "<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head>"
        '<body><div class="uc-main"><p class="uc-warning-caption">Google Drive can\'t scan this '
        'file for viruses.</p><form id="download-form" '
        f'action="{base}/download" method="get"><input type="submit" id="uc-download-link" '
        'value="Download anyway"/>'
        f'<input type="hidden" name="id" value="{file_id}">'
        '<input type="hidden" name="export" value="download">'
        '<input type="hidden" name="confirm" value="t">'
        '<input type="hidden" name="uuid" value="0c6f1e5a"></form></div></body></html>'
    )


@pytest.fixture
def server(tmp_path: Path):
    """(base URL, served folder) of a threaded HTTP server on 127.0.0.1."""
    served = tmp_path / "served"
    served.mkdir()
    _Handler.ranges = []

    def handler(*args, **kwargs):
        return _Handler(*args, directory=str(served), **kwargs)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    httpd.shutdown()
    httpd.server_close()


def _sha(data: bytes) -> tuple[str]:
    return ("sha256:" + hashlib.sha256(data).hexdigest(),)


def test_fetch_downloads_and_verifies(server, tmp_path):
    base, served = server
    payload = bytes(range(256)) * 4000
    (served / "file.bin").write_bytes(payload)
    target = fetch(f"{base}/file.bin", tmp_path / "out" / "file.bin", _sha(payload), False)
    assert target.read_bytes() == payload
    assert not (tmp_path / "out" / "file.bin.part").exists()


def test_fetch_resumes_a_partial_download(server, tmp_path):
    base, served = server
    payload = bytes(range(256)) * 4000
    (served / "file.bin").write_bytes(payload)
    target = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(payload[:1000])
    fetch(f"{base}/file.bin", target, _sha(payload), False)
    assert target.read_bytes() == payload
    assert _Handler.ranges == ["bytes=1000-"]


def test_a_partial_file_is_resumed_only_from_its_own_address(server, tmp_path):
    base, served = server
    payload = bytes(range(256)) * 4000
    (served / "file.bin").write_bytes(payload)
    (served / "mirror.bin").write_bytes(payload)
    target = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(b"x" * 1000)  # begun from another address
    (tmp_path / "file.bin.part.url").write_text(f"{base}/file.bin")
    fetch(f"{base}/mirror.bin", target, _sha(payload), False)
    assert target.read_bytes() == payload
    assert _Handler.ranges == [None]  # started over
    assert not list(tmp_path.glob("file.bin.part*"))


def test_checksum_mismatch_deletes_the_file(server, tmp_path):
    base, served = server
    (served / "file.bin").write_bytes(b"changed upstream")
    with pytest.raises(DownloadError, match="checksum mismatch.*deleted"):
        fetch(f"{base}/file.bin", tmp_path / "file.bin", _sha(b"original"), False)
    assert not list(tmp_path.glob("file.bin*"))


def test_any_of_the_published_checksums_is_accepted(server, tmp_path):
    base, served = server
    payload = b"the published file"
    (served / "file.bin").write_bytes(payload)
    accepted = ("md5:" + hashlib.md5(payload).hexdigest(), *_sha(b"another copy"))
    assert fetch(f"{base}/file.bin", tmp_path / "file.bin", accepted, False).exists()


def test_malformed_checksum_declarations_are_refused():
    with pytest.raises(ValueError, match="sha256:<64 hex>"):
        UpstreamFile(url="u", filename="f", provides=("f",), checksums=("sha256:abc",))
    with pytest.raises(ValueError, match="crc32"):
        UpstreamFile(url="u", filename="f", provides=("f",), checksums=("crc32:" + "0" * 8,))


def test_an_html_page_instead_of_the_file_is_reported(server, tmp_path):
    base, _ = server
    with pytest.raises(DownloadError, match="web page"):
        fetch(f"{base}/page.bin", tmp_path / "page.bin", (), False)


@pytest.mark.parametrize("file_id", ["big.bin", "old.bin"])
def test_google_drive_confirmation_page_is_passed(server, tmp_path, file_id):
    base, served = server
    payload = bytes(range(256)) * 400
    (served / file_id).write_bytes(payload)
    target = fetch(f"{base}/uc?export=download&id={file_id}", tmp_path / "f", _sha(payload), False)
    assert target.read_bytes() == payload


def test_google_drive_download_resumes_past_the_confirmation_page(server, tmp_path):
    base, served = server
    payload = bytes(range(256)) * 400
    (served / "big.bin").write_bytes(payload)
    (tmp_path / "f.part").write_bytes(payload[:5000])
    fetch(f"{base}/uc?export=download&id=big.bin", tmp_path / "f", _sha(payload), False)
    assert (tmp_path / "f").read_bytes() == payload
    assert _Handler.ranges == ["bytes=5000-"]


def test_google_drive_quota_page_is_named(server, tmp_path):
    base, _ = server
    with pytest.raises(DownloadError, match="quota is exceeded.*24 hours"):
        fetch(f"{base}/uc?export=download&id=quota.bin", tmp_path / "f", (), False)


def _truncated_archive(tmp_path: Path, archive: Path) -> Path:
    folder = tmp_path / "src" / "inner"
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("x" * 100_000)
    tar_folder(folder, archive)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    return archive


def test_corrupt_downloaded_archive_is_deleted_and_leaves_nothing(tmp_path):
    archive = _truncated_archive(tmp_path, tmp_path / "bundle.tar.gz")
    target = tmp_path / "dataset"
    with pytest.raises(UserError, match="truncated or corrupt.*deleted.*again"):
        extract_archive(archive, target, downloaded=True)
    assert not archive.exists()
    assert list(target.iterdir()) == []  # no half-written folder, no staging leftovers


def test_corrupt_archive_placed_by_hand_is_kept_and_named(tmp_path):
    archive = _truncated_archive(tmp_path, tmp_path / "bundle.tar.gz")
    target = tmp_path / "dataset"
    with pytest.raises(UserError, match="truncated or corrupt.*kept.*placed by hand") as caught:
        extract_archive(archive, target)
    assert str(archive) in str(caught.value)
    assert archive.exists()
    assert list(target.iterdir()) == []


def test_download_deletes_a_corrupt_archive_it_fetched(server, tmp_path, monkeypatch):
    base, served = server
    _truncated_archive(tmp_path, served / "w.tar.gz")
    monkeypatch.setattr(Waterbirds, "upstream", (_waterbirds_from([f"{base}/w.tar.gz"]),))
    with pytest.raises(UserError, match="truncated or corrupt.*deleted"):
        download_dataset(Waterbirds, tmp_path / "data", show_progress=False)
    assert not (tmp_path / "data" / "waterbirds" / Waterbirds.upstream[0].filename).exists()


@pytest.mark.parametrize("command", ["prepare", "download"])
def test_a_corrupt_archive_placed_by_hand_is_kept(tmp_path, capsys, command):
    root = tmp_path / "data" / "waterbirds"
    root.mkdir(parents=True)
    placed = _truncated_archive(tmp_path, root / Waterbirds.upstream[0].filename)
    assert main([command, "waterbirds", "--data-dir", str(tmp_path / "data"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{placed} is truncated or corrupt" in err and "kept" in err
    assert placed.exists()


def _fill_the_disk_on_the_second_file(monkeypatch, module, name: str) -> None:
    """Make `module.name` (the copy of one member's bytes) fail with ENOSPC on its second call,
    after writing part of that member."""
    original = getattr(module, name)
    calls = []

    def copy(source, destination, *args, **kwargs):
        calls.append(source)
        if len(calls) == 2:
            destination.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(source, destination, *args, **kwargs)

    monkeypatch.setattr(module, name, copy)


def _archive_of_three_files(tmp_path: Path, archive: Path) -> Path:
    folder = tmp_path / "src" / "inner"
    folder.mkdir(parents=True)
    for name in ("a.txt", "b.txt", "c.txt"):
        (folder / name).write_text(name * 1000)
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as bundle:
            for path in sorted(folder.iterdir()):
                bundle.write(path, f"inner/{path.name}")
        return archive
    return tar_folder(folder, archive)


@pytest.mark.parametrize(
    ("archive_name", "module", "copy_function"),
    [("bundle.tar.gz", tarfile, "copyfileobj"), ("bundle.zip", shutil, "copyfileobj")],
)
@pytest.mark.parametrize("downloaded", [False, True])
def test_a_full_disk_keeps_the_archive_and_leaves_no_partial_target(
    tmp_path, monkeypatch, archive_name, module, copy_function, downloaded
):
    target = tmp_path / "dataset"
    target.mkdir()
    archive = _archive_of_three_files(tmp_path, target / archive_name)
    _fill_the_disk_on_the_second_file(monkeypatch, module, copy_function)
    with pytest.raises(UserError) as caught:
        extract_archive(archive, target, downloaded=downloaded)
    message = str(caught.value)
    assert "\n" not in message
    assert "no space left on device" in message and "archive was kept" in message
    assert f"extracting {archive} into {target}" in message and "free" in message
    assert archive.exists()
    assert list(target.iterdir()) == [archive]  # no half-extracted inner/, no staging folder


def test_a_full_disk_while_preparing_keeps_the_archive_placed_by_hand(
    served_waterbirds, tmp_path, monkeypatch, capsys
):
    root = tmp_path / "data" / "waterbirds"
    root.mkdir(parents=True)
    placed = root / Waterbirds.upstream[0].filename
    placed.write_bytes(served_waterbirds.read_bytes())
    _fill_the_disk_on_the_second_file(monkeypatch, tarfile, "copyfileobj")
    assert main(["prepare", "waterbirds", "--data-dir", str(tmp_path / "data"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left on device" in err
    assert placed.exists()
    assert list(root.iterdir()) == [placed]


def test_extraction_replaces_a_previous_copy(tmp_path):
    folder = tmp_path / "src" / "inner"
    folder.mkdir(parents=True)
    (folder / "new.txt").write_text("new")
    archive = tar_folder(folder, tmp_path / "bundle.tar.gz")
    (tmp_path / "dataset" / "inner").mkdir(parents=True)
    (tmp_path / "dataset" / "inner" / "old.txt").write_text("old")
    extract_archive(archive, tmp_path / "dataset")
    assert sorted(p.name for p in (tmp_path / "dataset" / "inner").iterdir()) == ["new.txt"]


@pytest.fixture
def served_waterbirds(server, tmp_path, monkeypatch):
    base, served = server
    folder = write_waterbirds(tmp_path / "upstream")
    archive = tar_folder(folder, served / "waterbirds.tar.gz")
    item = Waterbirds.upstream[0]
    patched = UpstreamFile(
        url=f"{base}/waterbirds.tar.gz",
        filename=item.filename,
        provides=item.provides,
        checksums=_sha(archive.read_bytes()),
        extract=True,
    )
    monkeypatch.setattr(Waterbirds, "upstream", (patched,))
    return archive


def test_download_command_fetches_extracts_and_converts(served_waterbirds, tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["download", "waterbirds", "--data-dir", str(data), "--quiet"]) == 0
    root = data / "waterbirds"
    assert (root / "metadata_waterbirds.csv").is_file()
    assert (root / "waterbird_complete95_forest2water2" / "metadata.csv").is_file()
    assert not (root / "waterbird_complete95_forest2water2.tar.gz").exists()
    assert "waterbirds is ready" in capsys.readouterr().out
    assert Waterbirds(data).split("train").y.shape == (172,)


def test_prepare_extracts_an_archive_placed_by_hand(served_waterbirds, tmp_path):
    root = tmp_path / "data" / "waterbirds"
    root.mkdir(parents=True)
    (root / Waterbirds.upstream[0].filename).write_bytes(served_waterbirds.read_bytes())
    prepare_dataset(Waterbirds, tmp_path / "data", show_progress=False)
    assert (root / "metadata_waterbirds.csv").is_file()
    assert (root / Waterbirds.upstream[0].filename).is_file()  # the user's copy is kept


def test_failed_download_says_which_files_to_place_where(tmp_path, monkeypatch, capsys):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    item = Waterbirds.upstream[0]
    dead = UpstreamFile(
        url=f"http://127.0.0.1:{port}/w.tar.gz",
        filename=item.filename,
        provides=item.provides,
        extract=True,
    )
    monkeypatch.setattr(Waterbirds, "upstream", (dead,))
    data = tmp_path / "data"
    assert main(["download", "waterbirds", "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "could not download" in err
    assert str(data / "waterbirds" / item.filename) in err
    assert "waterbird_complete95_forest2water2/metadata.csv" in err
    assert f"robustbench-mat prepare waterbirds --data-dir {data}" in err


def test_prepare_without_files_names_them(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["prepare", "celeba", "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert "list_attr_celeba.txt" in err and "img_align_celeba" in err
    assert "robustbench-mat prepare celeba" in err


def test_missing_data_names_the_path_and_the_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTBENCH_MAT_DATA", str(tmp_path / "elsewhere"))
    dataset = Waterbirds(weights="none")
    with pytest.raises(UserError) as caught:
        dataset.split("train")
    message = str(caught.value)
    assert str(tmp_path / "elsewhere" / "waterbirds" / "metadata_waterbirds.csv") in message
    assert f"robustbench-mat download waterbirds --data-dir {tmp_path / 'elsewhere'}" in message
    assert "robustbench-mat prepare waterbirds" in message


def test_in_memory_datasets_need_no_download():
    with pytest.raises(UserError, match="needs no download"):
        dataset_class("colored-digits")


def test_download_skips_files_in_place(served_waterbirds, tmp_path):
    data = tmp_path / "data"
    download_dataset(Waterbirds, data, show_progress=False)
    calls = len(_Handler.ranges)
    download_dataset(Waterbirds, data, show_progress=False)
    assert len(_Handler.ranges) == calls


def _waterbirds_from(urls: list[str], checksums: tuple[str, ...] = ()) -> UpstreamFile:
    item = Waterbirds.upstream[0]
    return UpstreamFile(
        url=urls[0],
        mirrors=tuple(urls[1:]),
        filename=item.filename,
        provides=item.provides,
        checksums=checksums,
        extract=True,
    )


def test_a_mirror_serves_when_the_first_address_fails(server, tmp_path, monkeypatch):
    base, served = server
    archive = tar_folder(write_waterbirds(tmp_path / "upstream"), served / "w.tar.gz")
    (served / "changed.tar.gz").write_bytes(b"not the published archive")
    urls = [f"{base}/gone.tar.gz", f"{base}/changed.tar.gz", f"{base}/w.tar.gz"]
    item = _waterbirds_from(urls, _sha(archive.read_bytes()))
    monkeypatch.setattr(Waterbirds, "upstream", (item,))
    download_dataset(Waterbirds, tmp_path / "data", show_progress=False)
    assert (tmp_path / "data" / "waterbirds" / "metadata_waterbirds.csv").is_file()


def test_every_failed_address_is_named(server, tmp_path, monkeypatch):
    base, _ = server
    urls = [f"{base}/gone.tar.gz", f"{base}/uc?export=download&id=quota.bin"]
    monkeypatch.setattr(Waterbirds, "upstream", (_waterbirds_from(urls),))
    with pytest.raises(UserError) as caught:
        download_dataset(Waterbirds, tmp_path / "data", show_progress=False)
    message = str(caught.value)
    assert f"{urls[0]}: HTTP 404" in message
    assert f"{urls[1]}: Google Drive refuses the file" in message
    assert f"download {urls[0]} or {urls[1]} to" in message


def test_a_file_placed_by_hand_is_checked_and_kept(served_waterbirds, tmp_path, capsys):
    folder = write_waterbirds(tmp_path / "repacked")
    (folder / "README.txt").write_text("re-packed by a mirror")
    root = tmp_path / "data" / "waterbirds"
    root.mkdir(parents=True)
    placed = root / Waterbirds.upstream[0].filename
    tar_folder(folder, placed)
    args = ["prepare", "waterbirds", "--data-dir", str(tmp_path / "data"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"checksum mismatch for {placed.name}" in err and "--skip-checksum" in err
    assert placed.exists()  # the user's copy is not deleted
    assert main([*args, "--skip-checksum"]) == 0
    assert (root / "metadata_waterbirds.csv").is_file()


# --- disk space --------------------------------------------------------------------------------


def _free_disk(monkeypatch, free: int) -> None:
    """Make every file system report `free` bytes free."""
    usage = shutil._ntuple_diskusage(10 * free + 1, 9 * free + 1, free)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)


def _sized(item: UpstreamFile, size: int | None, unpacked: int | None = None) -> UpstreamFile:
    return dataclasses.replace(item, size=size, unpacked_size=unpacked)


def test_download_prints_each_size_and_the_free_space(
    served_waterbirds, tmp_path, monkeypatch, capsys
):
    size = served_waterbirds.stat().st_size
    item = _sized(Waterbirds.upstream[0], size, 3 * size)
    monkeypatch.setattr(Waterbirds, "upstream", (item,))
    _free_disk(monkeypatch, 5 * 2**30)
    download_dataset(Waterbirds, tmp_path / "data", show_progress=True)
    out = capsys.readouterr().out.splitlines()
    root = tmp_path / "data" / "waterbirds"
    assert out[:3] == [
        f"downloading waterbirds into {root}:",
        f"  {item.filename}: {format_bytes(size)} (an archive: unpacks to "
        f"{format_bytes(3 * size)}; deleted once extracted)",
        f"  needed: {format_bytes(4 * size)}; free there: 5 GiB",
    ]
    assert (root / "metadata_waterbirds.csv").is_file()


def test_an_undeclared_size_is_said_to_be_unknown(served_waterbirds, tmp_path, capsys):
    download_dataset(Waterbirds, tmp_path / "data", show_progress=True)
    out = capsys.readouterr().out.splitlines()
    assert out[1] == (
        f"  {Waterbirds.upstream[0].filename}: size unknown (an archive: unpacked size unknown; "
        f"deleted once extracted)"
    )
    assert out[2].startswith("  needed: unknown; free there: ")


def test_too_little_free_space_is_refused_before_downloading(
    served_waterbirds, tmp_path, monkeypatch, capsys
):
    item = _sized(Waterbirds.upstream[0], 500 * 2**20, 2**30)
    monkeypatch.setattr(Waterbirds, "upstream", (item,))
    _free_disk(monkeypatch, 2**30)
    data = tmp_path / "data"
    assert main(["download", "waterbirds", "--data-dir", str(data), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert (
        f"not enough free space to download waterbirds into {data / 'waterbirds'}: it needs "
        f"1.49 GiB and 1 GiB is free there. Free 500 MiB on that file system, or pass --data-dir"
    ) in err
    assert _Handler.ranges == []  # not a byte requested
    assert not data.exists()  # nor written


def test_the_space_check_counts_a_partial_download_and_deleted_archives(tmp_path):
    archive = UpstreamFile(url="u", filename="a.zip", provides=("a",), extract=True)
    archive = _sized(archive, 100, 300)
    plain = _sized(UpstreamFile(url="u", filename="b.txt", provides=("b.txt",)), 50)
    assert space_needed(tmp_path, [archive, plain]) == (400, True)  # the archive, then 300 kept
    assert space_needed(tmp_path, [plain, archive]) == (450, True)
    (tmp_path / "a.zip.part").write_bytes(b"x" * 40)
    assert space_needed(tmp_path, [archive]) == (360, True)
    unknown = _sized(plain, None)
    assert space_needed(tmp_path, [archive, unknown]) == (360, False)


def test_too_little_space_for_the_content_length_is_refused_before_writing(
    server, tmp_path, monkeypatch
):
    base, served = server
    (served / "file.bin").write_bytes(b"x" * 300_000)
    _free_disk(monkeypatch, 200_000)
    with pytest.raises(NotEnoughSpace) as caught:
        fetch(f"{base}/file.bin", tmp_path / "out" / "file.bin", (), False)
    assert str(caught.value) == (
        f"not enough free space to download file.bin into {tmp_path / 'out'}: it needs 293 KiB "
        f"and 195 KiB is free there. Free 97.7 KiB on that file system, or pass --data-dir with "
        f"a folder on a disk with more space; nothing was downloaded"
    )
    assert list((tmp_path / "out").iterdir()) == []


def test_the_content_length_check_keeps_and_resumes_a_partial_download(
    server, tmp_path, monkeypatch
):
    base, served = server
    payload = bytes(range(256)) * 1000
    (served / "file.bin").write_bytes(payload)
    target = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(payload[:1000])
    _free_disk(monkeypatch, len(payload) - 1001)  # one byte short of the rest
    with pytest.raises(NotEnoughSpace, match="it needs 249 KiB.*Free 1 B on"):
        fetch(f"{base}/file.bin", target, _sha(payload), False)
    assert (tmp_path / "file.bin.part").read_bytes() == payload[:1000]
    _free_disk(monkeypatch, len(payload) - 1000)
    fetch(f"{base}/file.bin", target, _sha(payload), False)
    assert target.read_bytes() == payload
    assert _Handler.ranges == ["bytes=1000-", "bytes=1000-"]


def test_the_content_length_refusal_reaches_the_command_line(
    served_waterbirds, tmp_path, monkeypatch, capsys
):
    _free_disk(monkeypatch, 1000)
    data = tmp_path / "data"
    assert main(["download", "waterbirds", "--data-dir", str(data), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    name = Waterbirds.upstream[0].filename
    assert f"not enough free space to download {name} into {data / 'waterbirds'}" in err
    assert "could not download" not in err  # not taken for a host failure; no mirror tried
    assert list((data / "waterbirds").iterdir()) == []


def test_the_declared_download_size_of_a_dataset():
    plain = UpstreamFile(url="u", filename="b.txt", provides=("b.txt",))
    assert declared_download_size((_sized(plain, 3 * 2**20), _sized(plain, 2**20))) == (
        "4 MiB in 2 files"
    )
    assert declared_download_size((_sized(plain, 2**20), plain)) == (
        "at least 1 MiB in 2 files, 1 of them of unknown size"
    )
    assert declared_download_size((plain,)) == "size unknown (1 file)"
