"""The scaling study: how well each fp8 scaling of LAMB16 keeps the moments of
real MNIST CNN gradients, and how far each LAMB16 step's trajectory strays
from the same step with float32 state (`python cli.py scaling`)."""

import math
import statistics

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lamb16.updates import adam_direction, clamped_square_sum, lamb16_trust_ratio, new_moments, weight_norm_of
from lamb16.updates import DEFAULT_BLOCK_SIZE
from lamb16.quantize import (E4M3, E4M3_MAX, E5M2, SEED_M_CLAMP, as_rows, block_grid, dequantize, dequantize_blocks,
                             from_rows, store_absmax, store_blocks, store_seed)

from . import registry
from .stats import stat
from .data import Split
from .loop import make_model, train_step

LAYERS = ("conv1.weight", "conv2.weight", "fc1.weight")


def relative_error(approx: Tensor, exact: Tensor) -> float:
    return float((approx - exact).norm() / exact.norm())


def moment_quantization_table(
    train_data: Split, steps: int, batch_size: int, lr: float, seed: int, layers: tuple[str, ...] = LAYERS
) -> list[dict]:
    """How well each scaling keeps the moments of real MNIST CNN gradients.

    A float32 LAMB trains the CNN; its gradients also feed float32 moments and,
    per scaling, a chain of fp8-stored moments updated exactly as Lamb16 does.
    Every 10 steps, the float32 moments are stored once in fp8 (`store_*`: the
    format's resolution under that scaling, with the fractions that saturate or
    flush to zero); at the end the fp8 chain is compared with them (`drift_*`:
    rounding errors accumulated through the moving averages).
    """
    device = train_data.images.device
    torch.manual_seed(seed)
    model = make_model(device)
    optimizer = registry.build("lamb", model.parameters(), lr=lr, weight_decay=0.0)
    beta1, beta2 = optimizer.defaults["betas"]
    eps = optimizer.defaults["eps"]
    params = dict(model.named_parameters())
    scalings = {"seed": lambda m, v, a, b: store_seed(m, v, a, b, eps), "absmax": store_absmax,
                "block": lambda m, v, a, b: store_blocks(m, v, a, b, DEFAULT_BLOCK_SIZE)}
    moments = {name: (torch.zeros_like(params[name]), torch.zeros_like(params[name])) for name in layers}
    chains = {
        (s, name): [torch.zeros_like(params[name], dtype=E4M3), torch.zeros_like(params[name], dtype=E5M2),
                    *(torch.ones(scale_shape(params[name], s), device=device) for _ in range(2))]
        for s in scalings
        for name in layers
    }
    checks: dict[tuple[str, str], list[dict]] = {key: [] for key in chains}
    order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(seed)).to(device)

    for step in range(1, steps + 1):
        index = order[(step - 1) * batch_size % len(train_data) :][:batch_size]
        train_step(model, optimizer, train_data.images[index], train_data.labels[index])
        for name in layers:
            grad = params[name].grad
            m, v = moments[name]
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            for scaling, store in scalings.items():
                chain = chains[(scaling, name)]
                chain_m, chain_v = new_moments(grad, chain[0], chain[1], *expand(chain, scaling), beta1, beta2)
                chain[2], chain[3] = store(chain_m, chain_v, chain[0], chain[1])
                if step % 10 == 0:
                    checks[(scaling, name)].append(store_check(m, v, store, scaling))
    rows = []
    for (scaling, name), found in checks.items():
        chain = chains[(scaling, name)]
        m, v = moments[name]
        row = dict(layer=name, elements=params[name].numel(), scaling=scaling)
        row.update({key: statistics.median(c[key] for c in found) for key in found[0]})
        m_scale, v_scale = expand(chain, scaling)
        row["drift_m"] = relative_error(dequantize(chain[0], m_scale), m)
        row["drift_v"] = relative_error(dequantize(chain[1], v_scale), v)
        rows.append(row)
    return sorted(rows, key=lambda r: (r["elements"], r["scaling"] != "seed"))


def scale_shape(param: Tensor, scaling: str) -> tuple[int, ...]:
    return block_grid(tuple(param.shape), DEFAULT_BLOCK_SIZE) if scaling == "block" else ()


def expand(chain: list[Tensor], scaling: str) -> tuple[Tensor, Tensor]:
    """A chain's two scales, spread over the elements they scale where they
    are block grids (a scale per tensor stays as it is)."""
    if scaling != "block":
        return chain[2], chain[3]
    codes, rows = chain[0], chain[2].shape[0]
    ones = torch.ones_like(as_rows(codes, rows), dtype=torch.float32)
    return tuple(from_rows(dequantize_blocks(ones, scales, DEFAULT_BLOCK_SIZE), codes) for scales in chain[2:])


def store_check(m: Tensor, v: Tensor, store, scaling: str) -> dict:
    """One fp8 store of float32 moments: its errors, and what saturated or flushed."""
    m8, v8 = torch.empty_like(m, dtype=E4M3), torch.empty_like(v, dtype=E5M2)
    m_scale, v_scale = expand([m8, v8, *store(m, v, m8, v8)], scaling)
    limit = (SEED_M_CLAMP if scaling == "seed" else E4M3_MAX) * (1 + 1e-6)  # beyond the bound, not on it
    return dict(
        store_m=relative_error(dequantize(m8, m_scale), m),
        store_v=relative_error(dequantize(v8, v_scale), v),
        saturated_m=float(((m / m_scale).abs() > limit).float().mean()),
        flushed_m=float(((m8.float() == 0) & (m != 0)).float().mean()),
        flushed_v=float(((v8.float() == 0) & (v != 0)).float().mean()),
    )


def markdown(rows: list[dict]) -> str:
    lines = [
        "| tensor | elements | scaling | store m | store v | drift m | drift v | m saturated | m flushed to 0 "
        "| v flushed to 0 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['elements']:,} | {r['scaling']} | {r['store_m']:.3f} | {r['store_v']:.3f} | "
            f"{r['drift_m']:.3f} | {r['drift_v']:.3f} | {100 * r['saturated_m']:.1f}% | "
            f"{100 * r['flushed_m']:.2f}% | {100 * r['flushed_v']:.2f}% |"
        )
    return "\n".join(lines)


class Float32StateLamb16(Optimizer):
    """LAMB16's exact step with its moments kept in float32: what the fp8 state
    and the single pass depart from. For the deviation study only."""

    def __init__(self, params, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-6,
                 trust_scale: float = 0.382) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, trust_scale=trust_scale))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v = state["m"], state["v"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = adam_direction(m, v, p, group["eps"], group["weight_decay"])
                update_norm = clamped_square_sum(update, group["eps"]).sqrt() / p.numel()
                trust = lamb16_trust_ratio(weight_norm_of(p, group["eps"]), update_norm, group["lr"],
                                           group["trust_scale"])
                p.sub_(update * (trust * group["lr"]))


def trajectory_deviation(
    train_data: Split, steps: int, batch_size: int, lr: float, seed: int, optimizers: tuple[str, ...],
    weight_decay: float = 0.01,
) -> dict[str, float]:
    """How far each optimizer's weights end from those of LAMB16 with float32
    state, relative to the distance that one travelled: ||w - w32|| / ||w32 - w0||
    over all the CNN's weights after `steps` steps.

    Open loop: the float32-state LAMB16 trains the CNN on MNIST batches, and
    each optimizer, from the same initial weights, takes the very gradients it
    was given, so that the deviation measures the steps alone, not where
    different weights would have led the gradients."""
    device = train_data.images.device
    torch.manual_seed(seed)
    model = make_model(device)
    start = [p.detach().clone() for p in model.parameters()]
    reference = Float32StateLamb16(model.parameters(), lr=lr, weight_decay=weight_decay)
    followers = {}
    for name in optimizers:
        params = [nn.Parameter(p.clone()) for p in start]
        followers[name] = (params, registry.build(name, params, lr=lr, weight_decay=weight_decay))
    order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(seed)).to(device)
    for step in range(steps):
        index = order[step * batch_size % len(train_data):][:batch_size]
        train_step(model, reference, train_data.images[index], train_data.labels[index])
        for params, optimizer in followers.values():
            for p, q in zip(params, model.parameters()):
                p.grad = q.grad.clone()
            optimizer.step()
    weights = [p.detach() for p in model.parameters()]
    travelled = math.sqrt(sum(float((p - w0).square().sum()) for p, w0 in zip(weights, start)))
    return {
        name: math.sqrt(sum(float((p.detach() - q).square().sum()) for p, q in zip(params, weights))) / travelled
        for name, (params, _) in followers.items()
    }


def deviation_table(train_data: Split, steps: int, batch_size: int, lr: float, seeds: list[int],
                    optimizers: tuple[str, ...]) -> str:
    """trajectory_deviation() over seeds, as markdown: per optimizer the mean ±
    std over seeds, and its ratio to the first optimizer's, paired by seed."""
    found = [trajectory_deviation(train_data, steps, batch_size, lr, seed, optimizers) for seed in seeds]
    first = optimizers[0]
    lines = [f"| optimizer | deviation from float32 state | x {first} |", "|---|---|---|"]
    for name in optimizers:
        value = stat([f[name] for f in found])
        ratio = stat([f[name] / f[first] for f in found])
        spread = "" if value.n == 1 else f" ± {value.std:.3f}"
        ratio_spread = "" if ratio.n == 1 else f" ± {ratio.std:.2f}"
        lines.append(f"| {name} | {value.mean:.3f}{spread} (n={value.n}) | {ratio.mean:.2f}{ratio_spread} |")
    return "\n".join(lines)
