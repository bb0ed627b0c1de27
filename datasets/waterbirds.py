"""Waterbirds (Sagawa et al. 2020): CUB birds pasted on Places backgrounds."""

from __future__ import annotations

from pathlib import Path

from robustbench_mat.errors import UserError
from robustbench_mat.images import ImageBenchmark, image_params
from robustbench_mat.metadata import UpstreamFile, require_columns, write_table
from robustbench_mat.protocols import XRM_CODE_OPTIMIZERS, PaperSetup
from robustbench_mat.registry import register_dataset

EXTRACTED = "waterbird_complete95_forest2water2"


@register_dataset("waterbirds")
class Waterbirds(ImageBenchmark):
    """Waterbirds: y = waterbird, a = water background (95% agreement in train).

    Upstream: `waterbird_complete95_forest2water2.tar.gz` (Stanford NLP, the GroupDRO release),
    extracted to `<data_dir>/waterbirds/waterbird_complete95_forest2water2/` (200 species folders
    and `metadata.csv` with `img_id,img_filename,y,split,place,place_filename`). Conversion renames
    img_id->id, img_filename->filename, place->a. Train groups (landbird/land, landbird/water,
    waterbird/land, waterbird/water) hold 3498, 184, 56 and 1057 images; val 1199 and test 5794,
    group-balanced within each class. Transform: resize 256x256, centre-crop 224, ImageNet
    normalisation. `--data features=resnet50` trains a head on cached frozen ResNet-50 features
    (the XRM/MAT "precomputed features" protocol). Its `val_avg_train_weighted` is the DFR/AFR
    "mean accuracy"; `val_avg`/`test_avg` are the plain accuracy the XRM and MAT papers report.
    """

    paper = "Sagawa et al. 2020, Distributionally Robust Neural Networks (arXiv 1911.08731)"
    n_classes = 2
    n_attributes = 2
    class_names = ("landbird", "waterbird")
    attribute_names = ("land", "water")
    folder = "waterbirds"
    metadata_name = "waterbirds"
    image_folder = EXTRACTED
    transform_kind = "waterbirds"
    default_steps = 5000
    default_eval_every = 500
    # The MAT/XRM code trains every Waterbirds model on frozen ResNet-50 features.
    paper_setup = PaperSetup(1001, 50, XRM_CODE_OPTIMIZERS["image"], data={"features": "resnet50"})
    params = image_params("waterbirds")
    upstream = (
        UpstreamFile(
            url="https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz",
            filename="waterbird_complete95_forest2water2.tar.gz",
            provides=(f"{EXTRACTED}/metadata.csv",),
            extract=True,
            note="about 0.5 GB",
        ),
    )

    @classmethod
    def convert(cls, root: Path) -> list[Path]:
        import pandas as pd  # here, not when `list` imports the plugin

        source = root / EXTRACTED / "metadata.csv"
        try:
            frame = pd.read_csv(source)
        except (pd.errors.ParserError, UnicodeDecodeError) as error:
            raise UserError(f"{source}: unreadable ({error}); download it anew") from None
        require_columns(frame, source, ("img_id", "img_filename", "y", "split", "place"))
        out = frame.rename(columns={"img_id": "id", "img_filename": "filename", "place": "a"})
        target = root / "metadata_waterbirds.csv"
        write_table(out[["id", "filename", "split", "y", "a"]], target)
        return [target]
