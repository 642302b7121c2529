"""How much memory an optimizer's state holds, read off the tensors themselves."""

from collections.abc import Iterator

from torch import Tensor
from torch.optim import Optimizer
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


def plain_tensors(value: Tensor) -> Iterator[Tensor]:
    """The tensors that hold a value's memory: itself, or for a wrapper
    subclass (a quantized state of torchao, a DTensor) the tensors inside it."""
    if is_traceable_wrapper_subclass(value):
        names, _ = value.__tensor_flatten__()
        for name in names:
            inner = getattr(value, name)
            if isinstance(inner, Tensor):  # a DTensor's names include its device mesh
                yield from plain_tensors(inner)
    else:
        yield value


def state_nbytes(optimizer: Optimizer) -> int:
    """Bytes of storage behind every tensor in `optimizer.state`, each storage counted once.

    Works for any torch optimizer (Adam, Lamb, Lamb16, low-bit optimizers whose
    state is a tensor subclass, ...): it measures the storages that exist, so
    it counts what a checkpoint or the device holds, including step counters,
    scales and logged norms.
    """
    storages: dict[tuple[str, int], int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                for tensor in plain_tensors(value):
                    storage = tensor.untyped_storage()
                    storages[(str(storage.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())
