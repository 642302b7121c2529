"""Learning-rate schedules, stepped once per batch: torch's own schedulers,
combined. A linear warmup over the first `warmup` fraction of the run's
steps (from 0 to the base lr), then the schedule over the rest: constant,
cosine (to 0, torch's CosineAnnealingLR) or linear (to 0, LinearLR)."""

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

SCHEDULES = ("constant", "cosine", "linear")
# LinearLR cannot start at 0 exactly: the first warmup step takes this fraction of the lr.
WARMUP_START = 1e-8


def warmup_steps(total_steps: int, warmup: float) -> int:
    return math.ceil(warmup * total_steps)


def make_scheduler(optimizer: Optimizer, schedule: str, warmup: float, total_steps: int) -> LRScheduler | None:
    """The scheduler of a run of `total_steps` optimizer steps, or None for a
    constant lr without warmup (the original script's, which needs none)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    warm = warmup_steps(total_steps, warmup)
    rest = max(total_steps - warm, 1)
    if schedule == "constant" and warm == 0:
        return None
    if schedule == "cosine":
        main: LRScheduler = CosineAnnealingLR(optimizer, T_max=rest, eta_min=0.0)
    elif schedule == "linear":
        main = LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=rest)
    else:
        main = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warm == 0:
        return main
    rise = LinearLR(optimizer, start_factor=WARMUP_START, end_factor=1.0, total_iters=warm)
    return SequentialLR(optimizer, [rise, main], milestones=[warm])
