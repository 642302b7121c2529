import sys
from pathlib import Path

import pytest

# Test helpers (reference.py, mnist_files.py, ...) import as plain modules.
sys.path.insert(0, str(Path(__file__).parent))

from mnist_files import write_synthetic_mnist  # noqa: E402


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A folder holding small synthetic MNIST files (MNIST/raw, IDX format)."""
    return write_synthetic_mnist(tmp_path / "data")
