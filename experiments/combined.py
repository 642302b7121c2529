"""Several torch optimizers over disjoint parameters as one Optimizer: one
param_groups list, one state, one state_dict, so that schedulers, checkpoints,
resume and the training loop see a single optimizer. Muon needs it: it takes
2-D weights only, and the rest go to AdamW."""

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


class Combined(Optimizer):
    """`parts`' parameter groups (the very dicts, so a scheduler's lr reaches
    them) and one shared state; step() steps each part."""

    def __init__(self, parts: list[Optimizer]) -> None:
        groups = [group for part in parts for group in part.param_groups]
        super().__init__(groups, defaults={})
        self.parts = parts
        self.link_parts()

    def link_parts(self) -> None:
        """Point each part at its slice of param_groups and at the shared state
        (load_state_dict replaces both)."""
        start = 0
        for part in self.parts:
            count = len(part.param_groups)
            part.param_groups = self.param_groups[start : start + count]
            part.state = self.state
            start += count

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "parts": self.parts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.link_parts()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss


def newton_schulz_float32(update: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                          eps: float) -> Tensor:
    """Muon's quintic Newton-Schulz orthogonalization (X <- aX + (bA + cA^2)X,
    A = XX^T, from X = G/|G|), in float32."""
    a, b, c = ns_coefficients
    x = update.float()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(update.dtype)


@contextlib.contextmanager
def float32_orthogonalization() -> Iterator[None]:
    """torch's Muon orthogonalizes in bfloat16, which CPUs without bfloat16
    matrix units run far slower than float32 (128 x 9216 products: 0.32 s
    against 0.006 s on 2 AVX2 cores): on the CPU it runs in float32 instead."""
    module = getattr(torch.optim, "_muon", None)
    original = getattr(module, "_zeropower_via_newtonschulz", None)
    if original is None:  # a torch whose Muon is laid out otherwise: its own arithmetic
        yield
        return
    module._zeropower_via_newtonschulz = newton_schulz_float32
    try:
        yield
    finally:
        module._zeropower_via_newtonschulz = original


class CpuMuon(torch.optim.Muon):
    """torch.optim.Muon, orthogonalizing in float32 when its weights are on the CPU."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        on_cpu = all(p.device.type == "cpu" for group in self.param_groups for p in group["params"])
        with float32_orthogonalization() if on_cpu else contextlib.nullcontext():
            return super().step(closure)


def muon_with_adamw(params: Iterable[Tensor], lr: float, weight_decay: float, momentum: float | None = None,
                    **adamw_options: Any) -> Combined:
    """torch.optim.Muon on every 2-D weight and AdamW on everything else (conv
    kernels, biases), as torch's documentation advises; Muon's authors would
    flatten conv kernels to 2-D instead. Muon's update is scaled to AdamW's RMS
    (adjust_lr_fn="match_rms_adamw") so that one lr serves both parts.
    `momentum` is Muon's (None: its default), `adamw_options` AdamW's (betas).
    On the CPU the orthogonalization runs in float32 (see `CpuMuon`)."""
    params = list(params)
    matrices = [p for p in params if p.ndim == 2]
    others = [p for p in params if p.ndim != 2]
    parts: list[Optimizer] = []
    if matrices:
        parts.append(CpuMuon(matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw",
                             **({} if momentum is None else dict(momentum=momentum))))
    if others:
        parts.append(torch.optim.AdamW(others, lr=lr, weight_decay=weight_decay, **adamw_options))
    return Combined(parts)
