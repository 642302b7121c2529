"""The one list of optimizers that every command, the benchmark, the figures and
the tests read. A new optimizer is one entry of OPTIMIZERS.

Each entry says how to build the optimizer from (params, lr, weight decay),
how to draw it (Adam red, LAMB green, LAMB16 blue, each with its own line
style and marker, so that a figure reads in greyscale), and how many bytes of
state a parameter of a large tensor needs. The low-bit AdamW peers of torchao
and bitsandbytes are imported only when used; without them installed, building
one is a one-line error naming the extra to install.
"""

import importlib
import importlib.util
import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

import lamb16

from .errors import UserError

PEERS_EXTRA = "pip install 'lamb16[peers]'"


@dataclass(frozen=True)
class Knob:
    """A hyperparameter a search sweep tunes (`sweep --trials`): the RunConfig
    field it sets and the range it is drawn from, on a log scale or not; a
    `complement` knob is drawn as 1 - value (1 - beta2 on a log scale puts as
    many draws between 0.99 and 0.999 as between 0.9 and 0.99)."""

    field: str
    low: float
    high: float
    log: bool = True
    complement: bool = False

    def describe(self) -> str:
        name = f"1 - {self.field}" if self.complement else self.field
        return f"{name} {self.low:g} to {self.high:g}" + (" (log)" if self.log else "")


# The search space every optimizer is tuned over, with the same ranges, so that
# each gets the same chance: the learning rate and weight decay on log scales,
# 1 - beta1 and 1 - beta2 on log scales, and the warmup fraction (as AlgoPerf
# tunes its baselines). An optimizer without some knob is searched over those it has.
LR = Knob("lr", 1e-3, 1.0)
WD = Knob("wd", 1e-4, 0.3)
BETA1 = Knob("beta1", 0.02, 0.5, complement=True)  # beta1 from 0.5 to 0.98
BETA2 = Knob("beta2", 1e-3, 0.1, complement=True)  # beta2 from 0.9 to 0.999
WARMUP = Knob("warmup", 0.0, 0.3, log=False)
ADAM_KNOBS = (LR, WD, BETA1, BETA2, WARMUP)
MOMENTUM_KNOBS = (LR, WD, BETA1, WARMUP)  # beta1 is the momentum
PLAIN_KNOBS = (LR, WD, WARMUP)


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    label: str
    build: Callable[..., Optimizer]  # (params, lr, weight_decay, **options)
    color: str
    linestyle: str
    marker: str
    state_bytes: float  # per parameter of a large tensor, as the design needs
    options: tuple[str, ...] = ("beta1", "beta2")  # further hyperparameters it takes (RunConfig fields)
    package: str | None = None  # a peer's package, imported lazily
    knobs: tuple[Knob, ...] = ADAM_KNOBS  # what a search sweep tunes

    @property
    def style(self) -> dict[str, Any]:
        return dict(color=self.color, linestyle=self.linestyle, marker=self.marker, label=self.label)


def adam_betas(beta1: float | None = None, beta2: float | None = None, defaults=(0.9, 0.999)) -> dict[str, Any]:
    """The `betas` option of an Adam-like optimizer where either is given (None: its default)."""
    if beta1 is None and beta2 is None:
        return {}
    return dict(betas=(defaults[0] if beta1 is None else beta1, defaults[1] if beta2 is None else beta2))


def quiet_import(module: str):
    """Import a peer's module without the warnings its import logs or raises
    about its own dependencies (torchao: torch's pytree registration notice),
    which would otherwise fill every sweep worker's output."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    finally:
        logging.disable(logging.NOTSET)


def quiet_compile_notices() -> None:
    """Keep the notices that a compiled step prints on its first call out of
    the output: torchao's state subclasses warn that they cannot be cached, and
    Inductor's C++ toolchain says there is no CUDA runtime on a CPU machine.
    Neither is about the run, and each sweep worker (and bench) printed both."""
    warnings.filterwarnings("ignore", message=".*does not implement _stable_hash_for_caching")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def from_package(module: str, attribute: str) -> Callable[..., Optimizer]:
    """A peer's optimizer class, imported when the first one is built."""

    def build(params: Iterable, lr: float, weight_decay: float, beta1: float | None = None,
              beta2: float | None = None, **options: Any) -> Optimizer:
        cls = getattr(quiet_import(module), attribute)
        quiet_compile_notices()
        return cls(params, lr=lr, weight_decay=weight_decay, **adam_betas(beta1, beta2), **options)

    return build


def _adam(params, lr, weight_decay, beta1=None, beta2=None, **options):
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **adam_betas(beta1, beta2), **options)


def _adamw(params, lr, weight_decay, beta1=None, beta2=None, **options):
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **adam_betas(beta1, beta2), **options)


def _sgd(params, lr, weight_decay, beta1=None, **options):
    return torch.optim.SGD(params, lr=lr, momentum=0.9 if beta1 is None else beta1, weight_decay=weight_decay,
                           **options)


def _lamb(params, lr, weight_decay, beta1=None, beta2=None, **options):
    return lamb16.Lamb(params, lr=lr, weight_decay=weight_decay, **adam_betas(beta1, beta2), **options)


def _lamb16(params, lr, weight_decay, beta1=None, beta2=None, **options):
    return lamb16.Lamb16(params, lr=lr, weight_decay=weight_decay, **adam_betas(beta1, beta2), **options)


def _lamb16_seed(params, lr, weight_decay, **options):
    return _lamb16(params, lr, weight_decay, scaling="seed", **options)


def _lamb16_single_pass(params, lr, weight_decay, **options):
    return _lamb16(params, lr, weight_decay, single_pass=True, **options)


def _lamb16_absmax(params, lr, weight_decay, **options):
    return _lamb16(params, lr, weight_decay, scaling="absmax", **options)


def _lamb16_absmax_single_pass(params, lr, weight_decay, **options):
    return _lamb16(params, lr, weight_decay, scaling="absmax", single_pass=True, **options)


def _lamb16_initial_lr(params, lr, weight_decay, **options):
    return _lamb16(params, lr, weight_decay, trust_lr="initial", **options)


def _lamb_paper(params, lr, weight_decay, **options):
    return _lamb(params, lr, weight_decay, bias_correction=True, max_weight_norm=None, **options)


def _adafactor(params, lr, weight_decay, **options):
    return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay, **options)


def _muon(params, lr, weight_decay, beta1=None, beta2=None):
    """beta1 is Muon's momentum and AdamW's first beta, beta2 AdamW's second."""
    from .combined import muon_with_adamw

    return muon_with_adamw(params, lr, weight_decay, momentum=beta1, **adam_betas(beta1, beta2))


LAMB16_OPTIONS = ("beta1", "beta2", "trust_scale")

OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("adam", "Adam", _adam, "tab:red", "--", "s", 8.0),
        OptimizerSpec("adamw", "AdamW", _adamw, "tab:orange", (0, (5, 1)), "D", 8.0),
        OptimizerSpec("sgd", "SGD (momentum 0.9)", _sgd, "tab:gray", (0, (1, 2)), "v", 4.0, options=("beta1",),
                      knobs=MOMENTUM_KNOBS),
        OptimizerSpec("lamb", "LAMB", _lamb, "tab:green", "-.", "^", 8.0),
        # The paper's LAMB: bias-corrected moments, no clamp on the weight norm.
        OptimizerSpec("lamb-paper", "LAMB (paper)", _lamb_paper, "darkgreen", (0, (8, 2)), "<", 8.0),
        # torch's Adafactor: no first moment, the second factored into a row and a
        # column vector (state grows with rows + columns, not elements).
        OptimizerSpec("adafactor", "Adafactor", _adafactor, "maroon", (0, (1, 1)), ">", 0.0, options=(),
                      knobs=PLAIN_KNOBS),
        # torch's Muon on 2-D weights (a float32 momentum: 4 bytes), AdamW on the rest;
        # beta1 is Muon's momentum and AdamW's first beta, beta2 AdamW's second.
        OptimizerSpec("muon", "Muon (+ AdamW)", _muon, "black", (0, (4, 2, 1, 2)), "X", 4.0),
        # LAMB16's default: a pair of float32 scales per block of 256 elements of a row (2 + 8 / 256 bytes).
        OptimizerSpec("lamb16", "LAMB16", _lamb16, "tab:blue", "-", "o", 2.03, options=LAMB16_OPTIONS),
        OptimizerSpec(
            "lamb16-seed", "LAMB16, seed scaling", _lamb16_seed, "tab:cyan", ":", "x", 2.0, options=LAMB16_OPTIONS
        ),
        OptimizerSpec(
            "lamb16-1pass", "LAMB16, single pass", _lamb16_single_pass, "navy", (0, (6, 2)), "d", 2.03,
            options=LAMB16_OPTIONS,
        ),
        # One pair of scales per tensor (the default before block scales).
        OptimizerSpec(
            "lamb16-absmax", "LAMB16, a scale per tensor", _lamb16_absmax, "royalblue", (0, (3, 2)), "H", 2.0,
            options=LAMB16_OPTIONS,
        ),
        OptimizerSpec(
            "lamb16-absmax-1pass", "LAMB16, a scale per tensor, single pass", _lamb16_absmax_single_pass,
            "dodgerblue", (0, (5, 1, 1, 1)), "+", 2.0, options=LAMB16_OPTIONS,
        ),
        # The trust factor (1e-3 / lr) ** trust_scale read at the schedule's initial lr, not the scheduled one.
        OptimizerSpec(
            "lamb16-initial", "LAMB16, trust at initial lr", _lamb16_initial_lr, "steelblue", (0, (1, 1)), "8", 2.03,
            options=LAMB16_OPTIONS,
        ),
        # torchao keeps tensors under 4096 elements in float32; blocks of 256
        # (8-bit, fp8) or 128 (4-bit) elements share a float32 scale per moment.
        OptimizerSpec(
            "ao-adamw8bit", "AdamW 8-bit (torchao)", from_package("torchao.optim", "AdamW8bit"),
            "tab:purple", (0, (3, 1, 1, 1)), "P", 2.03, package="torchao",
        ),
        OptimizerSpec(
            "ao-adamw4bit", "AdamW 4-bit (torchao)", from_package("torchao.optim", "AdamW4bit"),
            "tab:pink", (0, (3, 1, 1, 1, 1, 1)), "*", 1.06, package="torchao",
        ),
        OptimizerSpec(
            "ao-adamwfp8", "AdamW fp8 (torchao)", from_package("torchao.optim", "AdamWFp8"),
            "tab:brown", (0, (2, 2)), "h", 2.03, package="torchao",
        ),
        # bitsandbytes: blockwise 8-bit moments, blocks of 256 with a float32 absmax.
        OptimizerSpec(
            "bnb-adamw8bit", "AdamW 8-bit (bitsandbytes)", from_package("bitsandbytes.optim", "AdamW8bit"),
            "tab:olive", (0, (4, 1, 1, 1)), "p", 2.03, package="bitsandbytes",
        ),
    )
}


def spec(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def available(name: str) -> bool:
    """Whether an optimizer can be built here (a peer needs its package)."""
    package = spec(name).package
    return package is None or importlib.util.find_spec(package) is not None


def check_available(name: str) -> None:
    """Raise the one-line error for a peer whose package is not installed."""
    if not available(name):
        raise UserError(f"optimizer {name} needs the {spec(name).package} package: {PEERS_EXTRA}")


def build(name: str, params: Iterable, lr: float, weight_decay: float, **options: Any) -> Optimizer:
    """The named optimizer over `params`. Options it does not take (e.g. LAMB16's
    trust_scale for Adam, or beta2 for SGD) are refused, and None means the
    optimizer's default."""
    entry = spec(name)
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        raise UserError(f"optimizer {name} takes no {', '.join(unknown)}; drop it, or choose an optimizer that "
                        "takes it")
    check_available(name)
    return entry.build(params, lr=lr, weight_decay=weight_decay, **options)
