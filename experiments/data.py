"""MNIST, read with torchvision (its download and its IDX parser) and held as
one normalized tensor on the training device."""

import contextlib
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import UserError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CLASSES = 10
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass
class Split:
    """A whole MNIST split, normalized, on the training device."""

    images: Tensor  # (N, 1, 28, 28) float32
    labels: Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


def hold_out(train: Split, val_size: int) -> tuple[Split, Split | None]:
    """The training set less its last `val_size` images, and those images as a
    validation split: the same images for every run and seed, never trained on,
    so that choosing a setting by them leaves the test set unseen."""
    if val_size == 0:
        return train, None
    if not 0 < val_size < len(train):
        raise UserError(f"--val-size {val_size} must leave training images: the training set has {len(train)}; "
                        f"use at most {len(train) - 1}")
    cut = len(train) - val_size
    return (Split(train.images[:cut], train.labels[:cut]), Split(train.images[cut:], train.labels[cut:]))


def raw_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "MNIST" / "raw"


def download_mnist(data_dir: Path) -> None:
    """torchvision's download of whatever files are missing."""
    from torchvision.datasets import MNIST  # only the experiment side needs torchvision

    raw = raw_dir(data_dir)
    # The folders the download makes, removed again if it fails: a mistyped
    # --data-dir must not be left behind as an empty tree.
    made = [d for d in (raw, raw.parent, Path(data_dir)) if not d.exists()]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            MNIST(str(data_dir), train=True, download=True)
    except Exception as error:  # every mirror failed: no network, a proxy, a full disk
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"downloading MNIST into {raw} failed ({first}); if you have the files, point --data-dir (or "
            f"LAMB16_DATA_DIR) at the folder holding MNIST/raw, or copy the four ({', '.join(MNIST_FILES)}) "
            f"into {raw}, and pass --no-download"
        ) from error


def load_mnist(data_dir: Path, train: bool, device: torch.device, download: bool | None = False) -> Split:
    """One split of MNIST. `download`: fetch missing files (True), or not (False);
    None where the command offers no download (the error then suggests none)."""
    from torchvision.datasets import MNIST

    raw = raw_dir(data_dir)
    missing = [name for name in MNIST_FILES if not (raw / name).is_file()]
    if missing and download:
        download_mnist(data_dir)
    elif missing:
        fix = "point --data-dir (or LAMB16_DATA_DIR) at the folder that holds MNIST/raw"
        raise UserError(f"MNIST not found: {raw} lacks {', '.join(missing)}; {fix}"
                        + (", or pass --download" if download is False else ""))
    split = "train" if train else "t10k"
    try:
        dataset = MNIST(str(data_dir), train=train, download=False)
        images, labels = dataset.data, dataset.targets
    except Exception as error:  # the parser fails in many ways on a damaged file
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot read the MNIST {split} files in {raw} (corrupt, truncated or not IDX: {detail}); "
            "replace them with intact copies, or delete them and run again with --download"
        ) from error
    if images.dtype != torch.uint8 or images.dim() != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise UserError(
            f"the MNIST {split} files in {raw} do not fit together (images {tuple(images.shape)} {images.dtype}, "
            f"labels {tuple(labels.shape)}); replace them with intact copies"
        )
    if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < CLASSES):
        raise UserError(
            f"the MNIST {split} labels in {raw} hold {int(labels.min())}..{int(labels.max())}, not digits 0-9 "
            "(a damaged or foreign file); replace it with an intact copy"
        )
    normalized = (images.to(device=device, dtype=torch.float32) / 255 - MNIST_MEAN) / MNIST_STD
    return Split(images=normalized.unsqueeze(1), labels=labels.to(device=device, dtype=torch.int64))


def load_train_and_test(data_dir: Path, device: torch.device, download: bool | None = False) -> tuple[Split, Split]:
    return load_mnist(data_dir, True, device, download), load_mnist(data_dir, False, device, download)


_checksums: dict[tuple, str] = {}


def checksums(data_dir: Path) -> dict[str, str]:
    """SHA-256 of each MNIST file, for the run metadata (each file hashed once
    per process unless it changes)."""
    raw = raw_dir(data_dir).resolve()
    sums = {}
    for name in MNIST_FILES:
        path = raw / name
        if path.is_file():
            stat = path.stat()
            key = (path, stat.st_size, stat.st_mtime_ns)
            if key not in _checksums:
                _checksums[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            sums[name] = _checksums[key]
    return sums
