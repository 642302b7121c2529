import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Lamb16's Triton kernels run under Triton's interpreter, on CPU
# tensors (tests/test_triton.py). It is chosen when a kernel is defined, so
# before lamb16.triton_kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist runs the suite in a process a core: each takes one thread, not every core's.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Test helpers (reference.py, mnist_files.py, ...) import as plain modules.
sys.path.insert(0, str(Path(__file__).parent))

from mnist_files import write_synthetic_mnist  # noqa: E402


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A folder holding small synthetic MNIST files (MNIST/raw, IDX format)."""
    return write_synthetic_mnist(tmp_path / "data")
