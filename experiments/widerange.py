"""The wide-range study (`python cli.py widerange`): how far each low-bit
optimizer's updates stray from those of its float32 parent where a tensor's
values span many decades, as in the large models whose memory 2 bytes a
parameter is for: embedding rows that see rare tokens, magnitudes spread
within every block, a part of a tensor whose gradients fall while the rest
holds the scale.

Each probe is open loop: a stream of synthetic gradients, made in code, goes to
the low-bit optimizer and to its parent (LAMB16's: the same step with float32
moments; the peers': torch's AdamW), each from the same weights with no weight
decay, and the figure is the median, over a group of elements, of the ratio
of each element's displacement to the parent's over a window of steps. 1 is
the parent's update; below, the moments lost part of it (flushed to zero,
frozen); above, they inflated it (a second moment rounded towards zero).

The Zipf case trains a small next-token model whose embedding and output rows
see tokens drawn with Zipf frequencies: the same ratio per row, by the token's
frequency, then each optimizer trained closed loop, with its loss on the
pairs of each frequency band against its parent's.
"""

import math
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

import lamb16

from . import registry
from .quantization import Float32StateLamb16

Make = Callable[[list[nn.Parameter], float], Optimizer]  # (params, lr) -> optimizer, no weight decay


@dataclass(frozen=True)
class Variant:
    """A low-bit optimizer of the study and the float32 parent it is held to."""

    name: str
    make: Make
    parent: str  # "lamb16-float32" or "adamw"


def lamb16_variant(name: str, **options) -> Variant:
    return Variant(name, lambda params, lr: lamb16.Lamb16(params, lr=lr, **options), "lamb16-float32")


def peer_variant(name: str) -> Variant:
    return Variant(name, lambda params, lr: registry.build(name, params, lr=lr, weight_decay=0.0), "adamw")


PARENTS: dict[str, Make] = {
    "lamb16-float32": lambda params, lr: Float32StateLamb16(params, lr=lr, weight_decay=0.0),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
}

# LAMB16's scalings (block scales at several sizes) and the low-bit AdamWs.
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        lamb16_variant("lamb16-absmax", scaling="absmax"),
        lamb16_variant("lamb16-seed", scaling="seed"),
        lamb16_variant("lamb16-block32", scaling="block", block_size=32),
        lamb16_variant("lamb16-block128", scaling="block", block_size=128),
        lamb16_variant("lamb16-block256", scaling="block", block_size=256),
        lamb16_variant("lamb16-block1024", scaling="block", block_size=1024),
        lamb16_variant("lamb16-block256-1pass", scaling="block", block_size=256, single_pass=True),
        lamb16_variant("lamb16-absmax-1pass", scaling="absmax", single_pass=True),
        peer_variant("ao-adamw8bit"),
        peer_variant("ao-adamw4bit"),
        peer_variant("ao-adamwfp8"),
        peer_variant("bnb-adamw8bit"),
    )
}
PEERS = ("ao-adamw8bit", "ao-adamw4bit", "ao-adamwfp8", "bnb-adamw8bit")


def available(name: str) -> bool:
    return name not in PEERS or registry.available(name)


@dataclass(frozen=True)
class Probe:
    """A gradient stream over one tensor: each element's gradient scale (drawn
    once per seed, then changed with the step), and the groups of elements the
    figures are taken over."""

    name: str
    shape: tuple[int, int]
    steps: int
    lr: float
    window: int  # the last steps the displacement is taken over
    draw: Callable[[tuple[int, int], torch.Generator], Tensor]  # each element's scale
    at_step: Callable[[Tensor, int], Tensor]  # the scales at a step
    groups: Callable[[Tensor], dict[str, Tensor]]  # label -> boolean mask of the elements, from the drawn scales


SPAN = 8  # decades of gradient magnitude in the rows and spread probes
FALL_STEPS, FALL = 3000, 0.1  # the falling probe: half the tensor's gradients fall 10x over 3,000 steps, then hold


def rows_at_scales(shape: tuple[int, int], gen: torch.Generator) -> Tensor:
    """Rows (an embedding's, say) whose scale is log-uniform over SPAN decades."""
    return (10.0 ** (-SPAN * torch.rand(shape[0], 1, generator=gen))).expand(shape).clone()


def spread_elements(shape: tuple[int, int], gen: torch.Generator) -> Tensor:
    """Every element's scale log-uniform over SPAN decades: spread inside every block."""
    return 10.0 ** (-SPAN * torch.rand(shape, generator=gen))


def decades(scale: Tensor) -> dict[str, Tensor]:
    """Masks of the elements by decade of their scale below the largest."""
    below = -torch.log10(scale / scale.max())
    return {f"1e-{d}..1e-{d + 1}": (below >= d) & (below < d + 1) for d in range(SPAN)}


def falling_half(scale: Tensor, step: int, fall_steps: int = FALL_STEPS) -> Tensor:
    """The first half of the rows falls to FALL geometrically over `fall_steps` steps, then holds."""
    scale = scale.clone()
    scale[: len(scale) // 2] *= FALL ** (min(step, fall_steps) / fall_steps)
    return scale


def halves(scale: Tensor) -> dict[str, Tensor]:
    falling = torch.zeros(scale.shape, dtype=torch.bool)
    falling[: len(scale) // 2] = True
    return {"falling half": falling, "steady half": ~falling}


PROBES: dict[str, Probe] = {
    p.name: p
    for p in (
        Probe("rows", (256, 256), 200, 1e-3, 200, rows_at_scales, lambda scale, step: scale, decades),
        Probe("spread", (256, 256), 200, 1e-3, 200, spread_elements, lambda scale, step: scale, decades),
        Probe("falling", (128, 128), 4000, 1e-4, 200, lambda shape, gen: torch.ones(shape), falling_half, halves),
    )
}


def drawn_scales(probe: Probe, seed: int) -> Tensor:
    return probe.draw(probe.shape, torch.Generator().manual_seed(seed))


def gradient_stream(probe: Probe, seed: int) -> Iterator[Tensor]:
    """Gradients with a direction of their own per element (so that updates
    add up, not a random walk) and as much noise, times each element's scale."""
    scale = drawn_scales(probe, seed)
    direction = torch.randn(probe.shape, generator=torch.Generator().manual_seed(seed + 1))
    noise = torch.Generator().manual_seed(seed + 2)
    for step in range(probe.steps):
        yield probe.at_step(scale, step) * (direction + torch.randn(probe.shape, generator=noise))


def displacements(make: Make, probe: Probe, seed: int) -> Tensor:
    """Each element's displacement over the probe's last `window` steps."""
    weights = torch.randn(probe.shape, generator=torch.Generator().manual_seed(seed + 3)) * 0.1
    param = nn.Parameter(weights.clone())
    optimizer = make([param], probe.lr)
    start = weights
    for step, grad in enumerate(gradient_stream(probe, seed)):
        if step == probe.steps - probe.window:
            start = param.detach().clone()
        param.grad = grad
        optimizer.step()
    return param.detach() - start


def median_ratios(moved: Tensor, parent: Tensor, groups: dict[str, Tensor]) -> dict[str, float]:
    """Per group, the median of the elements' displacement over the parent's."""
    ratio = moved / parent
    return {label: float(ratio[mask & (parent != 0)].median()) for label, mask in groups.items() if mask.any()}


def probe_table(names: list[str], probes: list[str], seed: int) -> list[dict]:
    """A row per probe and variant: its median ratios by group."""
    rows = []
    for probe_name in probes:
        probe = PROBES[probe_name]
        groups = probe.groups(drawn_scales(probe, seed))
        parents = {parent: displacements(PARENTS[parent], probe, seed) for parent in {VARIANTS[n].parent for n in names}}
        for name in names:
            variant = VARIANTS[name]
            moved = displacements(variant.make, probe, seed)
            rows.append(dict(probe=probe_name, optimizer=name, parent=variant.parent,
                             ratios=median_ratios(moved, parents[variant.parent], groups)))
    return rows


# ------------------------------------------------------------------ Zipf ----


@dataclass(frozen=True)
class ZipfTask:
    """Next-token prediction over a vocabulary whose tokens come with Zipf
    frequencies: a token is followed by its successor (a fixed permutation)
    with probability `follow`, else by a fresh Zipf draw."""

    vocab: int = 2048
    width: int = 64
    exponent: float = 1.1
    follow: float = 0.8
    batch: int = 512
    steps: int = 400
    lr: float = 1e-2

    def probabilities(self) -> Tensor:
        weights = 1.0 / torch.arange(1, self.vocab + 1, dtype=torch.float64) ** self.exponent
        return (weights / weights.sum()).float()

    def successor(self, seed: int) -> Tensor:
        return torch.randperm(self.vocab, generator=torch.Generator().manual_seed(seed))

    def batches(self, seed: int, count: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(tokens, next tokens) pairs, the same stream for every optimizer."""
        gen = torch.Generator().manual_seed(seed + 1)
        probabilities, successor = self.probabilities(), self.successor(seed)
        for _ in range(count):
            tokens = torch.multinomial(probabilities, self.batch, replacement=True, generator=gen)
            fresh = torch.multinomial(probabilities, self.batch, replacement=True, generator=gen)
            follows = torch.rand(self.batch, generator=gen) < self.follow
            yield tokens, torch.where(follows, successor[tokens], fresh)


class Bigram(nn.Module):
    """A token embedding and an output layer: both a row per token."""

    def __init__(self, task: ZipfTask) -> None:
        super().__init__()
        self.embedding = nn.Embedding(task.vocab, task.width)
        self.output = nn.Linear(task.width, task.vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.output(torch.tanh(self.embedding(tokens)))


def bigram(task: ZipfTask, seed: int) -> Bigram:
    torch.manual_seed(seed)
    return Bigram(task)


def bands(task: ZipfTask) -> dict[str, Tensor]:
    """Masks of the tokens by decade of frequency rank (token k is the k-th
    most frequent): the top 10, ranks 10 to 100, ..., to the vocabulary's end."""
    rank = torch.arange(task.vocab)
    edges = [0] + [10**k for k in range(1, math.ceil(math.log10(task.vocab)))] + [task.vocab]
    return {(f"top {hi:,}" if lo == 0 else f"{lo:,}-{hi:,}"): (rank >= lo) & (rank < hi)
            for lo, hi in zip(edges, edges[1:])}


def zipf_displacements(makes: dict[str, Make], task: ZipfTask, seed: int) -> dict[str, dict[str, Tensor]]:
    """Open loop: a float32-state LAMB16 trains the model, and each optimizer of
    `makes`, from the same weights, takes the very gradients it was given (so
    that the figures measure the steps, not where other weights would have led
    the gradients). Each one's displacement of each parameter over the run."""
    model = bigram(task, seed)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    driver = PARENTS["lamb16-float32"](list(model.parameters()), task.lr)
    followers = {}
    for key, make in makes.items():
        params = [nn.Parameter(p.clone()) for p in start.values()]
        followers[key] = (params, make(params, task.lr))
    for tokens, targets in task.batches(seed, task.steps):
        driver.zero_grad()
        F.cross_entropy(model(tokens), targets).backward()
        for params, optimizer in followers.values():
            for p, q in zip(params, model.parameters()):
                p.grad = q.grad.clone()
            optimizer.step()
        driver.step()
    return {key: {name: p.detach() - s for (name, s), p in zip(start.items(), params)}
            for key, (params, _) in followers.items()}


def zipf_open_loop(names: list[str], task: ZipfTask, seed: int) -> list[dict]:
    """Per variant, the median update ratio of the embedding's and the output
    layer's rows by the frequency band of their token, against its parent fed
    the same gradients (those of a float32-state LAMB16 training the model)."""
    token_bands = bands(task)
    makes = {name: VARIANTS[name].make for name in names}
    makes.update({parent: PARENTS[parent] for parent in {VARIANTS[n].parent for n in names}})
    moves = zipf_displacements(makes, task, seed)
    rows = []
    for name in names:
        moved, parent = moves[name], moves[VARIANTS[name].parent]
        for layer in ("embedding.weight", "output.weight"):
            masks = {label: band[:, None].expand_as(moved[layer]) for label, band in token_bands.items()}
            rows.append(dict(optimizer=name, layer=layer, ratios=median_ratios(moved[layer], parent[layer], masks)))
    return rows


def band_losses(model: Bigram, task: ZipfTask, seed: int) -> dict[str, float]:
    """The loss on fresh pairs, by the frequency band of the first token (each band equally sampled)."""
    gen = torch.Generator().manual_seed(seed + 99)
    successor = task.successor(seed)
    losses = {}
    with torch.no_grad():
        for label, band in bands(task).items():
            members = band.nonzero().flatten()
            tokens = members[torch.randint(len(members), (4096,), generator=gen)]
            fresh = torch.multinomial(task.probabilities(), 4096, replacement=True, generator=gen)
            targets = torch.where(torch.rand(4096, generator=gen) < task.follow, successor[tokens], fresh)
            losses[label] = float(F.cross_entropy(model(tokens), targets))
    return losses


def zipf_closed_loop(make: Make, task: ZipfTask, seed: int) -> dict[str, float]:
    """Train the model with `make`'s optimizer; its loss by frequency band."""
    model = bigram(task, seed)
    optimizer = make(list(model.parameters()), task.lr)
    for tokens, targets in task.batches(seed, task.steps):
        optimizer.zero_grad()
        F.cross_entropy(model(tokens), targets).backward()
        optimizer.step()
    return band_losses(model, task, seed)


def zipf_losses(names: list[str], task: ZipfTask, seed: int) -> list[dict]:
    """Closed loop: each variant's and each parent's loss by frequency band."""
    parents = sorted({VARIANTS[n].parent for n in names})
    rows = [dict(optimizer=p, parent=None, losses=zipf_closed_loop(PARENTS[p], task, seed)) for p in parents]
    for name in names:
        rows.append(dict(optimizer=name, parent=VARIANTS[name].parent,
                         losses=zipf_closed_loop(VARIANTS[name].make, task, seed)))
    return rows


# ------------------------------------------------------------- tables ----


def ratio_table(rows: list[dict], key: str) -> str:
    """Markdown: a row per entry, a column per group label (in first-seen order)."""
    labels: list[str] = []
    for row in rows:
        labels += [label for label in row["ratios"] if label not in labels]
    head = ["optimizer", "parent" if key == "parent" else key, *labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{row['ratios'][label]:.3f}" if label in row["ratios"] else "" for label in labels]
        lines.append("| " + " | ".join([row["optimizer"], str(row[key]), *cells]) + " |")
    return "\n".join(lines)


def loss_table(rows: list[dict]) -> str:
    """Markdown: each optimizer's loss by band, and its difference from its parent's."""
    labels = list(rows[0]["losses"])
    lines = ["| optimizer | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
    parents = {row["optimizer"]: row["losses"] for row in rows if row["parent"] is None}
    for row in rows:
        cells = []
        for band in labels:
            value = row["losses"][band]
            delta = "" if row["parent"] is None else f" ({value - parents[row['parent']][band]:+.3f})"
            cells.append(f"{value:.3f}{delta}")
        lines.append(f"| {row['optimizer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def worst(ratios: dict[str, float]) -> float:
    """The group furthest from 1, on a log scale (for a one-line verdict)."""
    return max(ratios.values(), key=lambda r: abs(math.log(r)) if r > 0 else math.inf)


def summary(rows: list[dict]) -> dict[str, float]:
    return {row["optimizer"]: statistics.median(row["ratios"].values()) for row in rows}


DEFAULT_VARIANTS = ("lamb16-absmax", "lamb16-seed", "lamb16-block32", "lamb16-block128", "lamb16-block256",
                    "lamb16-block1024", "lamb16-block256-1pass", *PEERS)


def default_variants() -> list[str]:
    """The study's variants that can be built here (the peers need the peers extra)."""
    return [name for name in DEFAULT_VARIANTS if available(name)]


def run_study(names: list[str], probes: list[str], task: ZipfTask | None, seed: int, echo) -> dict:
    """Every probe, then the Zipf model (open loop, then closed loop), each
    table echoed as it is done; returns them all (for --json)."""
    for name in names:
        if name in PEERS:
            registry.check_available(name)
    report: dict = {"seed": seed, "probes": {}, "zipf": None}
    for probe in probes:
        spec = PROBES[probe]
        rows = probe_table(names, [probe], seed)
        echo(f"\n## probe {probe}: {spec.shape[0]} x {spec.shape[1]}, {spec.steps} steps at lr {spec.lr:g}; "
             f"median update ratio to the parent over the last {spec.window} steps\n")
        echo(ratio_table(rows, "parent"))
        report["probes"][probe] = rows
    if task is not None:
        echo(f"\n## Zipf bigram model: {task.vocab:,} tokens (Zipf {task.exponent}), width {task.width}, "
             f"batch {task.batch}, {task.steps} steps at lr {task.lr:g}\n")
        echo("Open loop (the gradients of a float32-state LAMB16 run): median update ratio of each token's row "
             "to the parent's, by frequency rank\n")
        open_rows = zipf_open_loop(names, task, seed)
        echo(ratio_table(open_rows, "layer"))
        echo("\nClosed loop: each optimizer trains the model; cross-entropy on fresh pairs by the first token's "
             "frequency rank (in brackets: minus the parent's)\n")
        loss_rows = zipf_losses(names, task, seed)
        echo(loss_table(loss_rows))
        report["zipf"] = dict(task=task.__dict__, open_loop=open_rows, closed_loop=loss_rows)
    return report
