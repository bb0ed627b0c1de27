"""Crafted archives and metadata cannot write or read outside the dataset folder: archive members
outside it, links, devices and setuid bits are refused or dropped; metadata filenames that are
absolute or climb out with `..` are refused when the table is read and when an image is opened."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from upstream_fixtures import write_waterbirds

from robustbench_mat.cli import main
from robustbench_mat.datasets.waterbirds import Waterbirds
from robustbench_mat.download import extract_archive, prepare_dataset
from robustbench_mat.errors import UserError
from robustbench_mat.images import ImageFiles


def _tar(archive: Path, *members: tarfile.TarInfo) -> Path:
    """A tar of `members`; regular files hold a few bytes."""
    with tarfile.open(archive, "w") as bundle:
        for member in members:
            data = b"content" if member.isreg() else None
            if data is not None:
                member.size = len(data)
            bundle.addfile(member, io.BytesIO(data) if data is not None else None)
    return archive


def _member(name: str, kind: bytes = tarfile.REGTYPE, **attributes) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    for key, value in attributes.items():
        setattr(member, key, value)
    return member


def _everything_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (_member("../escaped.txt"), "'..' component"),
        (_member("inner/../../escaped.txt"), "'..' component"),
        (_member("/tmp/robustbench-mat-escaped.txt"), "absolute path"),
        (_member("inner/link", tarfile.SYMTYPE, linkname="../../escaped.txt"), "symbolic link"),
        (_member("inner/local", tarfile.SYMTYPE, linkname="sibling.txt"), "symbolic link"),
        (_member("inner/hard", tarfile.LNKTYPE, linkname="../../etc/passwd"), "hard link"),
        (_member("inner/null", tarfile.CHRTYPE, devmajor=1, devminor=3), "device"),
        (_member("inner/disk", tarfile.BLKTYPE, devmajor=8, devminor=0), "device"),
        (_member("inner/pipe", tarfile.FIFOTYPE), "FIFO"),
    ],
)
def test_unsafe_tar_members_are_refused_by_name(tmp_path, capsys, member, reason):
    archive = _tar(tmp_path / "bundle.tar", _member("inner/sibling.txt"), member)
    target = tmp_path / "nest" / "dataset"
    with pytest.raises(UserError, match=f"refusing to extract {archive}.*{reason}") as caught:
        extract_archive(archive, target)
    assert repr(member.name) in str(caught.value)
    assert "\n" not in str(caught.value)
    assert archive.exists()  # not a corrupt archive: kept for the user to inspect
    assert _everything_under(target) == []
    assert not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/robustbench-mat-escaped.txt").exists()


def test_a_device_in_a_tar_creates_no_device_node(tmp_path):
    archive = _tar(
        tmp_path / "bundle.tar", _member("null", tarfile.CHRTYPE, devmajor=1, devminor=3)
    )
    with pytest.raises(UserError, match="'null' is a device"):
        extract_archive(archive, tmp_path / "dataset")
    devices = [p for p in _everything_under(tmp_path) if stat.S_ISCHR(p.lstat().st_mode)]
    assert devices == []


def test_a_setuid_root_file_in_a_tar_loses_its_setuid_bit_and_owner(tmp_path):
    suid = _member("inner/tool", mode=0o6755, uid=0, gid=0, uname="root", gname="root")
    writable = _member("inner/shared.txt", mode=0o666, uid=4242, gid=4242, uname="nobody")
    archive = _tar(tmp_path / "bundle.tar", suid, writable)
    extract_archive(archive, tmp_path / "dataset")
    tool = (tmp_path / "dataset" / "inner" / "tool").stat()
    assert not tool.st_mode & (stat.S_ISUID | stat.S_ISGID)
    assert tool.st_uid == os.getuid()
    shared = (tmp_path / "dataset" / "inner" / "shared.txt").stat()
    assert not shared.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    assert shared.st_uid == os.getuid()


def test_a_tar_is_refused_where_tarfile_lacks_extraction_filters(tmp_path, monkeypatch):
    archive = _tar(tmp_path / "bundle.tar", _member("inner/a.txt"))
    monkeypatch.delattr(tarfile, "data_filter")
    with pytest.raises(UserError, match=r"needs tarfile's extraction filters \(Python 3\.10\.12"):
        extract_archive(archive, tmp_path / "dataset")
    assert not (tmp_path / "dataset" / "inner").exists()


def _zip(archive: Path, *entries: tuple[str, int]) -> Path:
    """A zip of (name, unix mode) entries, each holding a few bytes."""
    with zipfile.ZipFile(archive, "w") as bundle:
        for name, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            bundle.writestr(info, b"../../escaped.txt" if stat.S_ISLNK(mode) else b"content")
    return archive


@pytest.mark.parametrize(
    ("name", "mode", "reason"),
    [
        ("../escaped.txt", stat.S_IFREG | 0o644, "'..' component"),
        ("inner/../../escaped.txt", stat.S_IFREG | 0o644, "'..' component"),
        ("/tmp/robustbench-mat-escaped.txt", stat.S_IFREG | 0o644, "absolute path"),
        ("C:/escaped.txt", stat.S_IFREG | 0o644, "absolute path"),
        ("inner\\..\\..\\escaped.txt", stat.S_IFREG | 0o644, "'..' component"),
        ("inner/link", stat.S_IFLNK | 0o777, "symbolic link"),
    ],
)
def test_unsafe_zip_members_are_refused_by_name(tmp_path, name, mode, reason):
    archive = _zip(tmp_path / "bundle.zip", ("inner/a.txt", stat.S_IFREG | 0o644), (name, mode))
    target = tmp_path / "dataset"
    with pytest.raises(UserError, match=f"refusing to extract {archive}.*{reason}") as caught:
        extract_archive(archive, target)
    assert repr(name) in str(caught.value)
    assert archive.exists()
    assert _everything_under(target) == []
    assert not (tmp_path / "escaped.txt").exists()


def test_zip_members_never_get_setuid_or_device_modes(tmp_path):
    """zipfile restores no permission bits nor file types: every member is a plain file."""
    archive = _zip(
        tmp_path / "bundle.zip",
        ("inner/tool", stat.S_IFREG | 0o6755),
        ("inner/null", stat.S_IFCHR | 0o666),
    )
    extract_archive(archive, tmp_path / "dataset")
    for name in ("tool", "null"):
        mode = (tmp_path / "dataset" / "inner" / name).lstat().st_mode
        assert stat.S_ISREG(mode)
        assert not mode & (stat.S_ISUID | stat.S_ISGID)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    write_waterbirds(tmp_path / "data" / "waterbirds")
    prepare_dataset(Waterbirds, tmp_path / "data", show_progress=False)
    return tmp_path / "data"


def _outside_image(tmp_path: Path) -> Path:
    """A readable JPEG outside the dataset folder, which a crafted filename would reach."""
    source = next((tmp_path / "data" / "waterbirds").rglob("*.jpg"))
    outside = tmp_path / "outside" / "x.jpg"
    outside.parent.mkdir()
    outside.write_bytes(source.read_bytes())
    return outside


@pytest.mark.parametrize("kind", ["climbing", "absolute"])
def test_metadata_filenames_outside_the_dataset_are_refused(data, tmp_path, kind):
    outside = _outside_image(tmp_path)
    image_root = Waterbirds(data).image_root()
    crafted = os.path.relpath(outside, image_root) if kind == "climbing" else str(outside)
    assert crafted.startswith("../") or crafted.startswith("/")
    path = data / "waterbirds" / "metadata_waterbirds.csv"
    lines = path.read_text().splitlines()
    fields = lines[4].split(",")
    fields[1] = crafted
    lines[4] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as caught:
        Waterbirds(data, weights="none").split("train")
    message = str(caught.value)
    assert f"{path}, line 5: filename {crafted!r} points outside the dataset folder" in message


def test_prepare_refuses_an_upstream_filename_outside_the_dataset(tmp_path, capsys):
    folder = write_waterbirds(tmp_path / "data" / "waterbirds")
    upstream = folder / "metadata.csv"
    upstream.write_text(upstream.read_text().replace(",001.", ",../../../outside/001.", 1))
    assert main(["prepare", "waterbirds", "--data-dir", str(tmp_path / "data"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "metadata_waterbirds.csv, line" in err and "'../../../outside/001." in err


@pytest.mark.parametrize("kind", ["climbing", "absolute"])
def test_an_image_path_outside_the_root_is_refused_when_opened(data, tmp_path, kind):
    outside = _outside_image(tmp_path)
    root = Waterbirds(data).image_root()
    crafted = os.path.relpath(outside, root) if kind == "climbing" else str(outside)
    images = ImageFiles(root, ["001.Black_footed_Albatross/x.jpg", crafted], lambda image: image)
    with pytest.raises(
        UserError, match=f"image {crafted!r} \\(row 1 of the metadata\\) is outside"
    ):
        images[1]
    assert ImageFiles(outside.parent, ["x.jpg"], lambda image: image.size)[0] == (24, 20)
