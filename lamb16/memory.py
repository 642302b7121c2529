"""How much memory an optimizer's state holds, read off the tensors themselves."""

from torch import Tensor
from torch.optim import Optimizer


def state_nbytes(optimizer: Optimizer) -> int:
    """Bytes of storage behind every tensor in `optimizer.state`, each storage counted once.

    Works for any torch optimizer (Adam, Lamb, Lamb16, ...): it measures the
    storages that exist, so it counts what a checkpoint or the device holds,
    including step counters, scales and logged norms.
    """
    storages: dict[tuple[str, int], int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                storage = value.untyped_storage()
                storages[(str(storage.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())
