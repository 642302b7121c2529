"""The settings of a run, each with its one default (the click options read them here)."""

import math
import typing
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one training run (written to config.json). The
    defaults are those of the original LAMB16 script."""

    optimizer: str = "lamb16"  # a name from experiments.registry
    batch_size: int = 64
    test_batch_size: int = 1000
    epochs: int = 10
    lr: float = 0.0025
    wd: float = 0.01  # weight decay
    seed: int = 1  # initial weights and data order
    log_interval: int = 10  # batches per train-loss record
    trust_scale: float | None = None  # LAMB16's exponent; None: the optimizer's default
    val_size: int = 0  # training images held out for validation (the last ones); 0: none
    schedule: str = "constant"  # the lr after warmup: constant, cosine or linear (experiments.schedules)
    warmup: float = 0.0  # the fraction of the run's steps over which the lr rises linearly from 0
    beta1: float | None = None  # the first moment's decay (SGD's and Muon's momentum); None: the optimizer's default
    beta2: float | None = None  # the second moment's decay; None: the optimizer's default

    def setting(self) -> str:
        """The settings a comparison shares, as a folder name (a constant lr
        without warmup, the original script's, adds nothing to it)."""
        name = f"b{self.batch_size}_lr{self.lr:g}_wd{self.wd:g}"
        if self.schedule != "constant":
            name += f"_{self.schedule}"
        if self.warmup:
            name += f"_warmup{self.warmup:g}"
        for field, value in (("beta1", self.beta1), ("beta2", self.beta2)):
            if value is not None:
                name += f"_{field}-{value:g}"
        return name

    def run_name(self) -> str:
        return f"{self.optimizer}_{self.setting()}_seed{self.seed}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """The settings of a config.json (which also holds metadata), each of
        its type and in its range; ValueError naming the first that is not."""
        if not isinstance(data, dict):
            raise ValueError(f"it holds a JSON {type(data).__name__}, not an object of settings")
        values = {f.name: typed(f.name, data[f.name], f.type) for f in fields(cls) if f.name in data}
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        """ValueError naming the first setting out of its range."""
        for name in ("batch_size", "test_batch_size", "epochs", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be at least 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr {self.lr} must be a finite number above 0")
        for name in ("wd", "trust_scale"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} {value} must be a finite number of at least 0")
        if self.val_size < 0:
            raise ValueError(f"val_size {self.val_size} must be at least 0")
        from .schedules import SCHEDULES

        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup {self.warmup} must be a fraction of the run, at least 0 and below 1")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"{name} {value} must be at least 0 and below 1")


def typed(name: str, value, annotation) -> object:
    """`value` as a setting of `annotation` (int, float, str, or one of them or None)."""
    kinds = typing.get_args(annotation) or (annotation,)
    if value is None and type(None) in kinds:
        return None
    if not isinstance(value, bool):  # JSON true is no number
        if isinstance(value, int) and int in kinds:
            return value
        if isinstance(value, (int, float)) and float in kinds:
            return float(value)
        if isinstance(value, str) and str in kinds:
            return value
    wanted = " or ".join("null" if k is type(None) else {int: "an integer", float: "a number", str: "a string"}[k]
                         for k in kinds)
    raise ValueError(f"{name} is {value!r}, not {wanted}")


DEFAULTS = RunConfig()

# The two figures of the original README: name, batch size, learning rate,
# and what it claims LAMB16 reaches there (test accuracy within so many epochs).
REPRODUCED_FIGURES = (
    dict(name="B1024L002", batch_size=1024, lr=0.02, claim=0.992, claim_epochs=10),
    dict(name="B128L001", batch_size=128, lr=0.01, claim=0.993, claim_epochs=5),
)
REPRODUCE_WD = 0.01
REPRODUCE_EPOCHS = 10
REPRODUCE_OPTIMIZERS = ("adam", "lamb", "lamb16", "lamb16-seed")
COMPARE_OPTIMIZERS = ("adam", "lamb", "lamb16")

# A run whose logged loss exceeds this multiple of its first batch's loss (about
# ln 10 = 2.3 for an untrained model) has diverged, even if the loss is finite.
DIVERGENCE_FACTOR = 10.0


def counted(n: int, noun: str) -> str:
    """"1 epoch", "3 epochs"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


MAX_SEEDS = 1000  # a count of seeds above this is a typo, not a study
MAX_SEED = 2**63 - 1  # the largest seed torch.manual_seed and torch.Generator take as given


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    """"3" means seeds 1, 2, 3; "1,5,9" means those seeds."""
    from .errors import UserError

    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        numbers = [int(item) for item in items]
    except ValueError:
        numbers = []
    if not numbers or ("," not in text and numbers[0] < 1):
        raise UserError(f"invalid {option} {text!r}: give a count (3 means seeds 1,2,3) or a list such as 1,2,3")
    if "," not in text and numbers[0] > MAX_SEEDS:
        raise UserError(f"invalid {option} {text!r}: a count of at most {MAX_SEEDS} seeds; to run one seed, list "
                        f"it with a comma ({option} {numbers[0]},)")
    outside = [n for n in numbers if not 0 <= n <= MAX_SEED] if "," in text else []
    if outside:
        raise UserError(f"invalid {option} {text!r}: seed {outside[0]} is outside 0 to 2**63-1; choose a smaller seed")
    seeds = list(range(1, numbers[0] + 1)) if "," not in text else numbers
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise UserError(f"invalid {option} {text!r}: seed {repeated[0]} is listed twice; list each seed once")
    return seeds


def parse_numbers(text: str, option: str, kind: type = float, allow_zero: bool = False) -> tuple:
    """"0.005,0.02" -> (0.005, 0.02), or a one-line error naming the option."""
    from .errors import UserError

    try:
        values = tuple(kind(item) for item in text.split(",") if item.strip())
    except ValueError:
        values = ()
    if not values or any(not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero) for v in values):
        sign = "non-negative" if allow_zero else "positive"
        raise UserError(f"invalid {option} {text!r}: give comma-separated {sign} {kind.__name__}s, e.g. "
                        f"{option} {'0.005,0.02' if kind is float else '128,1024'}")
    return values
