"""Search spaces: the settings a sweep with --trials N tries for each
optimizer, drawn by Optuna's quasi-random sampler (a scrambled Sobol sequence)
over the knobs the registry gives the optimizer, within their ranges.

The sequence is fixed (one seed): the first N settings of an optimizer are
the same whatever N a later sweep asks for, so a sweep extended to more
trials keeps every setting it trained. Optimizers with the same knobs get the
same settings: each meets the same draws.
"""

import functools
import warnings

from .registry import Knob, spec

SEQUENCE_SEED = 0
SIGNIFICANT = 3  # digits each drawn value keeps: readable run names, the same value read back from JSON


def distribution_name(knob: Knob) -> str:
    return f"one_minus_{knob.field}" if knob.complement else knob.field


def rounded(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT}g}")


def setting_of(knob: Knob, drawn: float) -> float:
    """The RunConfig value of a knob's draw (for a complement knob, 1 - the draw)."""
    drawn = rounded(drawn)
    return round(1.0 - drawn, 12) if knob.complement else drawn


@functools.cache
def settings(optimizer: str, count: int) -> tuple[dict[str, float], ...]:
    """The first `count` settings of `optimizer`'s search space: RunConfig
    fields (lr, wd, beta1, beta2, warmup, as the optimizer has them) to values."""
    import optuna
    from optuna.distributions import FloatDistribution

    knobs = spec(optimizer).knobs
    distributions = {distribution_name(k): FloatDistribution(k.low, k.high, log=k.log) for k in knobs}
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # QMCSampler: stable since Optuna 3
        sampler = optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=SEQUENCE_SEED,
                                             warn_independent_sampling=False, warn_asynchronous_seeding=False)
        study = optuna.create_study(sampler=sampler)
        drawn = []
        for _ in range(count):
            trial = study.ask(distributions)
            drawn.append({k.field: setting_of(k, trial.params[distribution_name(k)]) for k in knobs})
            study.tell(trial, 0.0)
    return tuple(drawn)


def describe(optimizer: str) -> str:
    """"lr 0.0003 to 1 (log), wd ..., 1 - beta1 0.02 to 0.5 (log), ...": an optimizer's space."""
    return ", ".join(k.describe() for k in spec(optimizer).knobs)
