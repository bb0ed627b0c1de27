"""CelebA with y = Blond_Hair and a = Male (Sagawa et al. 2020)."""

from __future__ import annotations

from pathlib import Path

from robustbench_mat.download import google_drive_url
from robustbench_mat.errors import UserError
from robustbench_mat.images import ImageBenchmark, image_params
from robustbench_mat.metadata import UpstreamFile, write_table
from robustbench_mat.protocols import XRM_CODE_OPTIMIZERS, PaperSetup
from robustbench_mat.registry import register_dataset

PARTITION = "list_eval_partition.txt"
ATTRIBUTES = "list_attr_celeba.txt"
IMAGES = "img_align_celeba"


def convert_celeba(root: Path) -> Path:
    """Zip the partition and attribute files line by line into `metadata_celeba.csv`."""
    import pandas as pd  # here, not when `list` imports the plugin

    partition_path, attribute_path = root / PARTITION, root / ATTRIBUTES
    try:
        partition = partition_path.read_text().split("\n")
        attributes = attribute_path.read_text().split("\n")
    except UnicodeDecodeError as error:
        raise UserError(f"{partition_path} or {attribute_path}: not text ({error})") from None
    partition = [line for line in partition if line.strip()]
    if len(attributes) < 3:
        raise UserError(f"{attribute_path}: expected a count, 40 names and one row per image")
    names = attributes[1].split()
    if "Blond_Hair" not in names or "Male" not in names:
        raise UserError(f"{attribute_path}, line 2: no Blond_Hair or Male attribute")
    blond, male = names.index("Blond_Hair") + 1, names.index("Male") + 1
    rows = [line for line in attributes[2:] if line.strip()]
    if len(rows) != len(partition):
        raise UserError(
            f"{attribute_path} has {len(rows)} image rows but {partition_path} has "
            f"{len(partition)} lines; download both anew"
        )
    records = []
    for number, (split_line, attr_line) in enumerate(zip(partition, rows, strict=True)):
        split_fields, fields = split_line.split(), attr_line.split()
        if len(split_fields) != 2 or split_fields[1] not in {"0", "1", "2"}:
            raise UserError(
                f"{partition_path}, line {number + 1}: expected '<image>.jpg 0|1|2', got "
                f"{split_line.strip()!r}"
            )
        if len(fields) != len(names) + 1 or fields[0] != split_fields[0]:
            raise UserError(
                f"{attribute_path}, line {number + 3}: expected {split_fields[0]} and "
                f"{len(names)} values of +-1, got {attr_line.strip()[:80]!r}"
            )
        records.append(
            (
                number + 1,
                fields[0],
                int(split_fields[1]),
                int(fields[blond] == "1"),
                int(fields[male] == "1"),
            )
        )
    target = root / "metadata_celeba.csv"
    write_table(pd.DataFrame(records, columns=["id", "filename", "split", "y", "a"]), target)
    return target


@register_dataset("celeba")
class CelebA(ImageBenchmark):
    """CelebA: y = Blond_Hair, a = Male; the minority group is blond men (about 1,387 in train).

    Upstream: `img_align_celeba/` (202,599 JPEGs of 178x218), `list_eval_partition.txt`
    (`000001.jpg 0` per line) and `list_attr_celeba.txt` (a count, 40 attribute names, then the
    file name and 40 values of +-1 per image) in `<data_dir>/celeba/`. Splits 162,770 / 19,867 /
    19,962. Transform: centre-crop 178, resize 224, ImageNet normalisation. The image zip comes
    from the PyTorch tutorial bucket (as in XRM); the two text files from Google Drive (as in
    BalancingGroups, XRM and SubpopBench), whose quota errors are the most reported problem:
    place the files by hand and run `prepare` then.
    """

    paper = "Liu et al. 2015; Sagawa et al. 2020 (GroupDRO)"
    n_classes = 2
    n_attributes = 2
    class_names = ("not-blond", "blond")
    attribute_names = ("female", "male")
    folder = "celeba"
    metadata_name = "celeba"
    image_folder = IMAGES
    transform_kind = "celeba"
    default_steps = 10_000
    default_eval_every = 1000
    # XRM runs on frozen ResNet-50 features; the other methods fine-tune the whole network.
    paper_setup = PaperSetup(
        10_001, 50, XRM_CODE_OPTIMIZERS["image"], inference_data={"features": "resnet50"}
    )
    params = image_params("celeba")
    # Digests of the published files: torchvision's CelebA list gives the md5 of the authors'
    # Google Drive files; PyTorch's tutorials pin the sha256 of the S3 copy of the image zip.
    # BalancingGroups' Drive copies come first for the text files, the authors' as mirrors.
    upstream = (
        UpstreamFile(
            url="https://s3.amazonaws.com/pytorch-tutorial-assets/img_align_celeba.zip",
            mirrors=(
                google_drive_url("1mb1R6dXfWbvk3DnlWOBO8pDeoBKOcLE6"),
                google_drive_url("0B7EVK8r0v71pZjFTYXZWM3FlRnM"),
            ),
            filename="img_align_celeba.zip",
            provides=(f"{IMAGES}/000001.jpg",),
            checksums=(
                "sha256:46fb89443c578308acf364d7d379fe1b9efb793042c0af734b6112e4fd3a8c74",
                "md5:00d2c5bc6d35e252742224ab0c1e8fcb",
            ),
            extract=True,
            note="about 1.4 GB",
            # The size of the file with this sha256 (and of the Drive copy, md5 00d2c5bc...),
            # as torchvision's download of it reports.
            size=1_443_490_838,
        ),
        UpstreamFile(
            url=google_drive_url("1acn0-nE4W7Wa17sIkKB0GtfW4Z41CMFB"),
            mirrors=(google_drive_url("0B7EVK8r0v71pY0NSMzRuSXJEVkk"),),
            filename=PARTITION,
            provides=(PARTITION,),
            checksums=("md5:d32c9cbf5e040fd4025c592c306e6668",),
            size=2_836_386,  # 202,599 lines of 14 bytes ("000001.jpg 0\r\n"), as downloaded
        ),
        UpstreamFile(
            url=google_drive_url("11um21kRUuaUNoMl59TCe2fb01FNjqNms"),
            mirrors=(google_drive_url("0B7EVK8r0v71pblRyaVFSWGxPY0U"),),
            filename=ATTRIBUTES,
            provides=(ATTRIBUTES,),
            checksums=("md5:75e246fa4810816ffd6ee81facbd244c",),
            size=26_721_026,  # as torchvision's download of this md5 reports
        ),
    )

    @classmethod
    def convert(cls, root: Path) -> list[Path]:
        return [convert_celeba(root)]
