"""The command line's shared pieces: option types and groups of options that
several commands take, and how a command reads what the user gave. cli.py's
commands are built from them."""

import functools
import math
from pathlib import Path

import click

from . import studies, tuning
from .config import DEFAULTS, MAX_SEED, RunConfig, parse_seeds
from .data import load_train_and_test
from .errors import UserError
from .runs import writable_dir, write_json
from .schedules import SCHEDULES

# Where an option's value came from when the user gave it (not its default).
GIVEN = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)


def given_options(ctx: click.Context, names) -> dict:
    """The options among `names` that the user gave, with their values."""
    return {name: ctx.params[name] for name in names if ctx.get_parameter_source(name) in GIVEN}


class FiniteFloat(click.ParamType):
    """A finite number at least `minimum` (above it when `open`): click's
    FloatRange lets nan through, and an lr of 0 trains nothing."""

    name = "float"

    def __init__(self, minimum: float = 0.0, open: bool = False, maximum: float = math.inf) -> None:
        self.minimum, self.open, self.maximum = minimum, open, maximum

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        low = number < self.minimum or (self.open and number == self.minimum)
        if not math.isfinite(number) or low or number > self.maximum:
            bound = f"above {self.minimum:g}" if self.open else f"at least {self.minimum:g}"
            if self.maximum < math.inf:
                bound += f" and at most {self.maximum:g}"
            self.fail(f"{value!r} is not a finite number {bound}", param, ctx)
        return number


POSITIVE = FiniteFloat(0.0, open=True)
NON_NEGATIVE = FiniteFloat(0.0)


def parse_list(text: str, choices, option: str) -> list[str]:
    """A comma-separated list, each item one of `choices`, or a usage error naming the bad ones."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in choices]
    if unknown or not items:
        raise click.BadParameter(f"unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(choices)}",
                                 param_hint=option)
    return items


def seeds_of(seeds: str | None, seed: int | None) -> list[int]:
    if seeds is not None and seed is not None:
        raise UserError("give --seed or --seeds, not both")
    return parse_seeds(seeds) if seeds is not None else [seed or DEFAULTS.seed]


def options(*decorators):
    """Several click decorators as one."""
    return lambda command: functools.reduce(lambda c, d: d(c), reversed(decorators), command)


data_dir_option = click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), default="./data", envvar="LAMB16_DATA_DIR",
    show_default=True, show_envvar=True, help="Folder holding MNIST/raw (torchvision's layout).",
)
download_option = click.option("--download/--no-download", default=True, show_default=True,
                               help="Download MNIST if it is missing.")
device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                             show_default=True, help="Where to train.")
progress_option = click.option("--progress/--no-progress", default=None,
                               help="tqdm bars [default: on when output is a terminal].")
data_options = options(data_dir_option, download_option, device_option, progress_option)


target_option = click.option("--target", type=FiniteFloat(0.0, maximum=1.0), default=tuning.DEFAULT_TARGET, show_default=True,
                             help="Validation accuracy whose samples-to-reach the report gives.")


tensorboard_option = click.option(
    "--tensorboard", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
    help="Also write the curves (losses, accuracies, lr, trust ratios) as TensorBoard events, a folder per run "
         "under DIR: tensorboard --logdir DIR.")


def check_tensorboard(directory: Path | None) -> None:
    """--tensorboard DIR: the package there and DIR writable, before anything trains."""
    if directory is not None:
        from .tensorboard import require

        require()
        writable_dir(directory, "--tensorboard")


def json_option(what: str):
    """--json FILE, its folder checked writable before anything runs."""
    def writable_parent(ctx, param, path: Path | None) -> Path | None:
        if path is not None:
            writable_dir(path.parent, "--json")
        return path

    return click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        callback=writable_parent, help=f"Also write the {what} to this JSON file.")


def write_json_output(path: Path | None, report: dict) -> None:
    """What --json asked for, if it did."""
    if path is not None:
        write_json(path, report)
        click.echo(f"\nwritten to {path}")


def seeds_option(default: str | None):
    return click.option("--seeds", default=default, show_default=default is not None,
                        help="Seeds to run: a count (3 = seeds 1,2,3) or a list (1,2,3).")


hyperparameter_options = options(
    click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS.batch_size, show_default=True, help="Training batch size."),
    click.option("--test-batch-size", type=click.IntRange(min=1), default=DEFAULTS.test_batch_size, show_default=True, help="Evaluation batch size."),
    click.option("--epochs", type=click.IntRange(min=1), default=DEFAULTS.epochs, show_default=True, help="Passes over the training set."),
    click.option("--lr", type=POSITIVE, default=DEFAULTS.lr, show_default=True, help="Learning rate."),
    click.option("--weight-decay", "--wd", "wd", type=NON_NEGATIVE, default=DEFAULTS.wd, show_default=True, help="Weight decay."),
    click.option("--seed", type=click.IntRange(0, MAX_SEED), default=None, help=f"Seed of the initial weights and data order [default: {DEFAULTS.seed}]."),
    click.option("--log-interval", type=click.IntRange(min=1), default=DEFAULTS.log_interval, show_default=True, help="Batches between train-loss records."),
    click.option("--trust-scale", type=NON_NEGATIVE, default=None, help="LAMB16 trust-ratio exponent [default: 0.382]."),
    click.option("--schedule", type=click.Choice(SCHEDULES), default=DEFAULTS.schedule, show_default=True, help="The lr after warmup, stepped per batch: constant, cosine or linear decay to 0."),
    click.option("--warmup", type=FiniteFloat(0.0, maximum=0.99), default=DEFAULTS.warmup, show_default=True, help="Fraction of the run's steps over which the lr rises linearly from 0."),
    click.option("--beta1", type=FiniteFloat(0.0, maximum=0.999999), default=None, help="First-moment decay (SGD's and Muon's momentum) [default: the optimizer's]."),
    click.option("--beta2", type=FiniteFloat(0.0, maximum=0.999999), default=None, help="Second-moment decay [default: the optimizer's]."),
)


def base_config(**hyperparameters) -> RunConfig:
    """The settings of --batch-size, --lr, ... (hyperparameter_options, but the seed) as a run's."""
    return RunConfig(**hyperparameters)


def load_data(data_dir: Path, download: bool | None, device: str):
    return load_train_and_test(data_dir, studies.device_of(device), download)


def warn_batch(config: RunConfig, train_size: int) -> None:
    if config.batch_size > train_size:
        click.echo(f"warning: batch size {config.batch_size} exceeds the {train_size} training images: "
                   f"each epoch is one batch of {train_size}", err=True)
