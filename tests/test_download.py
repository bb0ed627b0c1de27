"""Download, resume, checksum, atomic extraction and the prepare/download commands, against a
local HTTP server on 127.0.0.1 (never the network)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest
from upstream_fixtures import tar_folder, write_waterbirds

from robustbench_mat.cli import main
from robustbench_mat.datasets.waterbirds import Waterbirds
from robustbench_mat.download import (
    dataset_class,
    download_dataset,
    extract_archive,
    fetch,
    prepare_dataset,
)
from robustbench_mat.errors import UserError
from robustbench_mat.metadata import UpstreamFile


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the files of a folder, honouring `Range: bytes=N-`; logs the Range headers."""

    ranges: list[str | None] = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        if path.name == "page.bin":
            body = b"<html>quota exceeded</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
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


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


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


def test_checksum_mismatch_deletes_the_file(server, tmp_path):
    base, served = server
    (served / "file.bin").write_bytes(b"changed upstream")
    with pytest.raises(UserError, match="checksum mismatch.*deleted.*retry"):
        fetch(f"{base}/file.bin", tmp_path / "file.bin", _sha(b"original"), False)
    assert not list(tmp_path.glob("file.bin*"))


def test_an_html_page_instead_of_the_file_is_reported(server, tmp_path):
    from robustbench_mat.download import DownloadError

    base, _ = server
    with pytest.raises(DownloadError, match="web page"):
        fetch(f"{base}/page.bin", tmp_path / "page.bin", None, False)


def test_corrupt_archive_is_deleted_and_leaves_nothing(tmp_path):
    folder = tmp_path / "src" / "inner"
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("x" * 100_000)
    archive = tar_folder(folder, tmp_path / "bundle.tar.gz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])  # truncated
    target = tmp_path / "dataset"
    with pytest.raises(UserError, match="truncated or corrupt.*deleted.*again"):
        extract_archive(archive, target)
    assert not archive.exists()
    assert list(target.iterdir()) == []  # no half-written folder, no staging leftovers


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
        checksum=_sha(archive.read_bytes()),
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
