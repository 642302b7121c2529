"""Small synthetic MNIST files in the real IDX format, for tests that must pass without the real data."""

import struct
from pathlib import Path

import torch

TRAIN_SIZE, TEST_SIZE = 300, 100


def write_idx(path: Path, array: torch.Tensor, type_byte: int = 0x08) -> None:
    """The IDX format: two zero bytes, the type (0x08: ubyte), the number of dims, big-endian sizes, data."""
    header = struct.pack(">HBB", 0, type_byte, array.dim()) + b"".join(struct.pack(">I", s) for s in array.shape)
    path.write_bytes(header + array.to(torch.uint8).numpy().tobytes())


def write_synthetic_mnist(root: Path, seed: int = 0, train_size: int = TRAIN_SIZE, test_size: int = TEST_SIZE) -> Path:
    """Digit-like images: each label a fixed random stroke pattern plus noise, so a CNN can learn it."""
    gen = torch.Generator().manual_seed(seed)
    patterns = (torch.rand(10, 28, 28, generator=gen) > 0.8).float() * 255
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, size in (("train", train_size), ("t10k", test_size)):
        labels = torch.randint(0, 10, (size,), generator=gen)
        images = (patterns[labels] * 0.7 + torch.rand(size, 28, 28, generator=gen) * 70).clamp(0, 255)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root
