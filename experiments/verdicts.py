"""A sweep's verdicts: each chosen setting's confirmation runs (seeds that
took no part in choosing it), the focus optimizer against each peer at each
batch size, and each optimizer's largest batch against its smallest, paired
by seed, with paired t-tests corrected for the comparisons of their family
(experiments.stats).

Only confirmation runs give verdicts: the tuning seeds made a setting win its
choice, and the luck that helped it win would stay in any figure they gave
(a winner's curse, larger for an optimizer with more settings near the top).
"""

import statistics
from dataclasses import dataclass

from .config import RunConfig
from .runs import FINISHED, Run
from .stats import PairedTest, Stat, judged_together, paired_test, stat
from .tuning import Choice, in_registry_order, label, setting_of, test_accuracy

FOCUS = "lamb16"  # the optimizer a sweep's comparisons are about


@dataclass
class Judged:
    """One optimizer at one batch size: its choice, and the runs that judge it."""

    choice: Choice
    runs: list[Run]  # confirmation runs of the chosen setting, or (unconfirmed) the tuning runs
    confirmed: bool

    @property
    def test(self) -> Stat | None:
        return stat([test_accuracy(r) for r in self.runs])

    @property
    def diverged(self) -> int:
        return sum(r.diverged for r in self.runs)


def same_setting(run: Run, config: RunConfig) -> bool:
    """Whether a run trained `config`'s setting with the same budget (any seed)."""
    c = run.config
    budget = all(c.get(k) == getattr(config, k) for k in ("epochs", "val_size", "schedule", "test_batch_size"))
    return budget and setting_of(run)[:7] == (config.optimizer, config.batch_size, config.lr, config.wd,
                                             config.warmup, config.beta1, config.beta2)


def judge(choices: dict[tuple[str, int], Choice], confirmations: list[Run]) -> dict[tuple[str, int], Judged]:
    """Each choice with its finished confirmation runs (those of its setting,
    on seeds its tuning did not use); where no choice has any yet, the tuning
    runs, marked unconfirmed. Confirmation runs of a setting no longer chosen
    (the sweep was extended since) are left out, as are those still training."""
    judged = {}
    for key, choice in choices.items():
        tuning_seeds = {r.config["seed"] for r in choice.runs}
        mine = [r for r in confirmations if same_setting(r, choice.config) and r.config["seed"] not in tuning_seeds
                and r.status in FINISHED]
        judged[key] = Judged(choice, sorted(mine, key=lambda r: r.config["seed"]), True)
    if not any(j.runs for j in judged.values()):
        return {key: Judged(c, c.runs, False) for key, c in choices.items()}
    return judged


def paired(a: list[Run], b: list[Run]) -> PairedTest | None:
    """Test accuracy of `a` minus `b` over the seeds both completed (a diverged
    run has no test accuracy: its seed drops out of the pair)."""
    by_seed = {r.config["seed"]: test_accuracy(r) for r in b}
    diffs = [x - by_seed[r.config["seed"]] for r in a
             if (x := test_accuracy(r)) is not None and by_seed.get(r.config["seed"]) is not None]
    return paired_test(diffs)


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def mean_and_interval(s: Stat) -> str:
    """"99.12% (99.05-99.19)": the mean and its 95% interval (one seed: the mean alone)."""
    interval = s.interval()
    if interval is None:
        return percent(s.mean)
    return f"{percent(s.mean)} ({100 * interval[0]:.2f}-{100 * interval[1]:.2f})"


def accuracy_cell(s: Stat | None) -> str:
    """"99.12% (99.05-99.19), n=8"."""
    return "-" if s is None else f"{mean_and_interval(s)}, n={s.n}"


def signed(points: float) -> str:
    return f"{100 * points:+.2f}"


def difference_cells(test: PairedTest | None, with_tests: bool, planned: int = 0) -> list[str]:
    """Difference, 95% CI, and (with_tests) p, Holm's p, the smallest detectable
    difference, the verdict: of the seeds so far where fewer than the `planned` ones pair."""
    if test is None:
        return ["-"] * (6 if with_tests else 2)
    d = test.diff
    interval = d.interval()
    cells = [f"{signed(d.mean)} (n={d.n})",
             "-" if interval is None else f"{signed(interval[0])} to {signed(interval[1])}"]
    if with_tests:
        cells += ["-" if test.p is None else f"{test.p:.3g}",
                  "-" if test.p_corrected is None else f"{test.p_corrected:.3g}",
                  "-" if test.detectable is None else f"{100 * test.detectable:.2f}",
                  f"**{test.verdict}**" if d.n >= planned else f"{test.verdict}, so far ({d.n} of {planned} seeds)"]
    return cells


def setting_text(config: RunConfig) -> str:
    """"lr 0.03, wd 0.01, beta1 0.9, beta2 0.999, warmup 0.1" (the betas where set)."""
    parts = [f"lr {config.lr:g}", f"wd {config.wd:g}"]
    parts += [f"{name} {getattr(config, name):g}" for name in ("beta1", "beta2") if getattr(config, name) is not None]
    return ", ".join(parts + [f"warmup {config.warmup:g}"])


def reached(runs: list[Run], target: float) -> tuple[float, float, int] | None:
    """Median samples and seconds to `target` validation accuracy over the
    seeds that got there, and how many did; None where none did."""
    from .tuning import to_target

    hits = [h for h in (to_target(r, target) for r in runs) if h is not None]
    if not hits:
        return None
    return statistics.median(h[0] for h in hits), statistics.median(h[1] for h in hits), len(hits)


def reach(runs: list[Run], target: float) -> str:
    """"150k samples, 92 s (3/3)": `reached` as a table cell."""
    hit = reached(runs, target)
    if hit is None:
        return f"not reached (0/{len(runs)})"
    samples, seconds, count = hit
    return f"{samples / 1e3:.0f}k samples, {seconds:.0f} s ({count}/{len(runs)})"


def confirmed_markdown(judged: dict[tuple[str, int], Judged], target: float, planned: list[int] = ()) -> str:
    """The table of confirmed choices; `planned`: every confirmation seed, of
    which a row counts those whose run has ended (its n)."""
    confirmed = {k: j for k, j in judged.items() if j.confirmed}
    if not confirmed:
        return ""
    seeds = sorted(set(planned) | {r.config["seed"] for j in confirmed.values() for r in j.runs})
    under_way = any(len(j.runs) < len(seeds) for j in confirmed.values())
    so_far = " (a row's n: those of its seeds whose run has ended so far)" if under_way else ""
    lines = ["### Confirmed on fresh seeds", "",
             f"Each optimizer's setting chosen by validation on the tuning seeds, trained again on seeds "
             f"{', '.join(map(str, seeds))}, which took no part in choosing it{so_far}: its test accuracy (mean, 95% "
             f"interval, seeds), and the median samples and seconds to {100 * target:g}% validation accuracy (seeds "
             "that got there).", "",
             "| optimizer | batch | chosen setting | test accuracy (95% CI) | to target | diverged |",
             "|---|---|---|---|---|---|"]
    for optimizer in in_registry_order({o for o, _ in confirmed}):
        for batch_size in sorted(b for o, b in confirmed if o == optimizer):
            j = confirmed[(optimizer, batch_size)]
            lines.append(f"| {label(optimizer)} | {batch_size} | {setting_text(j.choice.config)} | "
                         f"{accuracy_cell(j.test)} | {reach(j.runs, target) if j.runs else '-'} | "
                         f"{j.diverged}/{len(j.runs)} |")
    return "\n".join(lines) + "\n"


def against_peers(judged: dict[tuple[str, int], Judged], focus: str = FOCUS) -> dict[int, dict[str, PairedTest | None]]:
    """Per batch size, `focus` minus each peer, the peers of a batch size one family."""
    tests: dict[int, dict[str, PairedTest | None]] = {}
    for batch_size in sorted({b for _, b in judged}):
        mine = judged.get((focus, batch_size))
        peers = in_registry_order({o for o, b in judged if b == batch_size and o != focus})
        if mine is None or not peers:
            continue
        family = judged_together([paired(mine.runs, judged[(o, batch_size)].runs) for o in peers])
        tests[batch_size] = dict(zip(peers, family))
    return tests


def across_batches(judged: dict[tuple[str, int], Judged]) -> tuple[int, int, dict[str, PairedTest | None]] | None:
    """Each optimizer's largest batch minus its smallest, the optimizers one family."""
    batch_sizes = sorted({b for _, b in judged})
    if len(batch_sizes) < 2:
        return None
    small, large = batch_sizes[0], batch_sizes[-1]
    optimizers = [o for o in in_registry_order({o for o, _ in judged}) if (o, small) in judged and (o, large) in judged]
    family = judged_together([paired(judged[(o, large)].runs, judged[(o, small)].runs) for o in optimizers])
    return small, large, dict(zip(optimizers, family))


def comparisons_markdown(judged: dict[tuple[str, int], Judged], focus: str = FOCUS, planned: int = 0) -> str:
    """How sure: the focus optimizer against each peer, and what the largest
    batch costs each optimizer. `planned`: the confirmation seeds, of which a
    comparison on fewer (confirmation under way) is only so far."""
    confirmed = all(j.confirmed for j in judged.values())
    if confirmed:
        columns = "| difference (points) | 95% CI | p | p, Holm | detectable | verdict |"
        rule = "|---|---|---|---|---|---|"
        how = ("on the confirmation seeds, paired by seed (the same initial weights and data order); a paired "
               "t-test, its p corrected by Holm's method for the comparisons of the table's family; higher or "
               "lower only where the corrected p is below 0.05; detectable: the smallest difference these seeds "
               "find with 80% power at the family's strictest level")
        if planned:
            how += (f"; a verdict on fewer seeds than the {planned} planned is only so far: the sweep's verdict is "
                    "the one on all of them (stopping at the first verdict that pleases would let luck decide)")
    else:
        columns, rule = "| difference (points) | 95% CI |", "|---|---|"
        how = ("on the seeds that chose each setting: their luck stays in these differences (a winner's curse), "
               "so they give no verdict; run the sweep again with --confirm-seeds 8 for verdicts")
    lines = []
    peers = against_peers(judged, focus)
    if peers:
        lines += ["", f"### {label(focus)} against each peer", "",
                  f"{label(focus)}'s test accuracy minus each peer's, each at its own chosen setting, {how}.", "",
                  f"| batch | against {columns}", f"|---|---{rule}"]
        for batch_size, tests in peers.items():
            for other, test in tests.items():
                lines.append(f"| {batch_size} | {label(other)} | "
                             + " | ".join(difference_cells(test, confirmed, planned)) + " |")
    scaling = across_batches(judged)
    if scaling:
        small, large, tests = scaling
        lines += ["", f"### Batch {large} against batch {small}", "",
                  f"Each optimizer's test accuracy at batch {large} minus at batch {small}, each tuned, {how}.", "",
                  f"| optimizer {columns}", f"|---{rule}"]
        for optimizer, test in tests.items():
            lines.append(f"| {label(optimizer)} | " + " | ".join(difference_cells(test, confirmed, planned)) + " |")
    return "\n".join(lines) + ("\n" if lines else "")


def glance_cell(j: Judged, target: float) -> str:
    """"99.35% (99.30-99.40), 150k, 80 s": test accuracy and its interval,
    median samples and seconds to the target (or "not reached")."""
    if j.test is None:
        return "-"
    hit = reached(j.runs, target)
    return f"{mean_and_interval(j.test)}, " + ("not reached" if hit is None else f"{hit[0] / 1e3:.0f}k, {hit[1]:.0f} s")


def verdict_cell(test: PairedTest | None) -> str:
    """"+0.81, higher (p 0.04)": the difference, the verdict, Holm's p."""
    if test is None:
        return "-"
    if test.p is None:
        return f"{signed(test.diff.mean)}, one seed"
    word = test.verdict if test.verdict in ("higher", "lower") else "none"
    p = test.p_corrected if test.p_corrected is not None else test.p
    return f"{signed(test.diff.mean)}, {word} (p {p:.2g})"


def standing(peers: dict[int, dict[str, PairedTest | None]], focus: str = FOCUS) -> str:
    """Where the focus optimizer wins, ties and loses, in a sentence."""
    said = []
    for word in ("higher", "lower"):
        parts = []
        for batch_size, tests in peers.items():
            if names := [label(o) for o, t in tests.items() if t is not None and t.verdict == word]:
                parts.append(f"{', '.join(names)} at batch {batch_size}")
        said.append(f"{word} than {'; '.join(parts) if parts else 'no peer'}")
    tests = [t for family in peers.values() for t in family.values() if t is not None and t.p is not None]
    ties = [t for t in tests if t.verdict == "no difference detected"]
    # Two decimals, as the detectable column of the peers' table gives them.
    detectable = sorted({f"{100 * t.detectable:.2f}" for t in ties if t.detectable is not None}, key=float)
    could = ""
    if detectable:
        span = detectable[0] if len(detectable) == 1 else f"{detectable[0]}-{detectable[-1]}"
        could = f" (where these seeds could detect {span} points)"
    return (f"{label(focus)} is {said[0]}, and {said[1]}; no difference is detected in the other "
            f"{len(ties)} of {len(tests)} comparisons{could}.")


def glance_markdown(judged: dict[tuple[str, int], Judged], target: float, planned: int = 0,
                    focus: str = FOCUS) -> str:
    """The answer first: each optimizer's confirmed test accuracy and time to
    the target per batch size, the focus optimizer minus each peer with its
    corrected verdict, and where it wins, ties and loses. Empty before any
    confirmation run has ended (the tuning seeds give no verdicts)."""
    if not judged or not all(j.confirmed for j in judged.values()):
        return ""
    batch_sizes = sorted({b for _, b in judged})
    ended = sorted({len(j.runs) for j in judged.values()})
    under_way = ended[0] < planned
    counts = f"{ended[0]}" if len(ended) == 1 else f"{ended[0]} to {ended[-1]}"
    so_far = (f" **Interim: the confirmation is under way ({counts} of each choice's {planned} seeds ended), and "
              "every verdict holds only for the seeds both sides have ended so far.**" if under_way else "")
    lines = ["### At a glance", "",
             f"Test accuracy on the confirmation seeds (mean, 95% interval), and the median samples and seconds "
             f"to {100 * target:g}% validation accuracy.{so_far}", "",
             "| optimizer | " + " | ".join(f"batch {b}" for b in batch_sizes) + " |",
             "|---" * (len(batch_sizes) + 1) + "|"]
    for optimizer in in_registry_order({o for o, _ in judged}):
        name = f"**{label(optimizer)}**" if optimizer == focus else label(optimizer)
        cells = [glance_cell(judged[(optimizer, b)], target) if (optimizer, b) in judged else "-" for b in batch_sizes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    peers = against_peers(judged, focus)
    if peers:
        others = in_registry_order({o for family in peers.values() for o in family})
        lines += ["", f"{label(focus)} minus each peer in points, paired by seed, with Holm's p over the peers of "
                  "a batch size (none: no difference detected):", "",
                  "| batch | " + " | ".join(label(o) for o in others) + " |", "|---" * (len(others) + 1) + "|"]
        lines += [f"| {b} | " + " | ".join(verdict_cell(family.get(o)) for o in others) + " |"
                  for b, family in peers.items()]
        lines += ["", ("So far: " if under_way else "") + standing(peers, focus)]
    return "\n".join(lines) + "\n\n"
