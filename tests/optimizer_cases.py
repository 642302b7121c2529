"""The one table of (optimizer, options) that the contract tests run over, as
PyTorch's OptimizerInfo drives its generic optimizer tests: every entry must
behave as torch.optim.Adam does under the same calls."""

from dataclasses import dataclass, field
from typing import Any

import torch

from lamb16 import Lamb, Lamb16


@dataclass(frozen=True)
class Case:
    name: str
    optimizer: type
    options: dict[str, Any] = field(default_factory=dict)
    lr_shape: tuple[int, ...] | None = None  # None: lr a float; else a tensor lr of this shape

    def __call__(self, params, **overrides: Any) -> torch.optim.Optimizer:
        """The optimizer over `params`, the case's options under the test's own."""
        options = {**self.options, **overrides}
        if self.lr_shape is not None:
            options["lr"] = torch.full(self.lr_shape, float(options.get("lr", 1e-3)))
        return self.optimizer(params, **options)

    def __repr__(self) -> str:
        return self.name


CASES = [
    Case("lamb", Lamb),
    Case("lamb-reference", Lamb, dict(fused=False)),
    Case("lamb-adam-wd", Lamb, dict(adam=True, weight_decay=0.05)),
    Case("lamb-paper", Lamb, dict(bias_correction=True, max_weight_norm=None, betas=(0.8, 0.99))),
    Case("lamb-tensor-lr", Lamb, dict(fused=False), lr_shape=(1, 1)),
    Case("lamb16", Lamb16),
    Case("lamb16-reference", Lamb16, dict(fused=False)),
    Case("lamb16-fused", Lamb16, dict(fused=True, weight_decay=0.05)),
    Case("lamb16-seed", Lamb16, dict(scaling="seed")),
    Case("lamb16-1pass", Lamb16, dict(single_pass=True)),
    Case("lamb16-1pass-reference", Lamb16, dict(single_pass=True, fused=False)),
    Case("lamb16-seed-1pass", Lamb16, dict(scaling="seed", single_pass=True)),
    Case("lamb16-betas-trust", Lamb16, dict(betas=(0.8, 0.99), trust_scale=0.5, eps=1e-8)),
    Case("lamb16-tensor-lr", Lamb16, dict(fused=False), lr_shape=(1,)),
    Case("lamb16-1pass-tensor-lr", Lamb16, dict(single_pass=True), lr_shape=()),
    Case("lamb16-small-blocks", Lamb16, dict(block_size=32)),
    Case("lamb16-absmax", Lamb16, dict(scaling="absmax")),
    Case("lamb16-absmax-1pass", Lamb16, dict(scaling="absmax", single_pass=True)),
]

# The cases whose tests are costly (torch.compile): one per optimizer and step kind.
CORE = [case for case in CASES if case.name in ("lamb", "lamb16", "lamb16-seed", "lamb16-1pass", "lamb16-absmax")]
