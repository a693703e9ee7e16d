"""The data group: which images a sweep trains on and how they are split, owned by the data
sources (tasks/data/)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from models.config_group import ConfigGroup
from tasks.data.spec import parse_dataset_spec


class DataConfig(ConfigGroup):
    SECTION = "1 Experiment"

    dataset: str = Field(
        title="dataset", default="fashion-mnist",
        description="Data: fashion-mnist, mnist or kmnist (28x28 grey, 10 classes); imagefolder:PATH "
        "(PATH/train/CLASS/*, PATH/test/CLASS/*, optional PATH/val/CLASS/*); package.module:function or "
        "path/to/file.py:function returning (train_images, train_labels, test_images, test_labels"
        "[, class_names]) tensors or (train, test[, class_names]) Datasets.")
    image_size: int | None = Field(
        title="image size", default=None, ge=1, le=4096,
        description="Resize every image to N x N (1-4096); none = the images' own size (they must all have one).")
    val_size: int | None = Field(
        title="validation images", default=None, ge=1,
        description="Images held out of the training images for validation (>= 1, leaving at least one "
        "to train on); none = one sixth of them (10,000 of the 60k built-ins). Not with a val/ folder.")
    split_seed: int = Field(
        title="split seed", default=0, ge=0, description="Seed of the train/validation split (the same for every trial).")
    train_limit: int | None = Field(
        title="training images limit (smoke runs)", default=None, ge=1,
        description="Train on at most this many images (>= 1; smoke runs, marked as such in the report); none = all.")
    num_workers: int = Field(
        title="data loader workers", default=2, ge=0, le=64,
        description="Worker processes that decode an image folder the first time (4,096 files or more) and "
        "read a Dataset too large for memory (0-64; 0 = in the process itself).")
    max_image_pixels: int = Field(
        title="image pixel limit", default=100_000_000, ge=1,
        description="An image folder's image with more pixels (width x height) is refused before it is "
        "decoded (a decompression bomb); >= 1.")
    data_dir: Path = Field(
        title="data directory", default=Path("data"),
        description="Dataset cache directory (downloads, decoded image folders).")

    @field_validator("dataset")
    @classmethod
    def _check_dataset(cls, spec: str) -> str:
        parse_dataset_spec(spec)  # the form only: the folder or the module is checked before training
        return spec
