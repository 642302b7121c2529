"""Straightforward float64 re-statements of the arithmetic in LAMB16.md, for the tests.

Written independently of `lamb16/`: loops over steps on one tensor, every
operation in float64 except the fp8 rounding itself, which goes through float32
(the optimizer's precision) exactly as the spec's e4m3( ) and e5m2( ) do.
"""

import torch
from torch import Tensor

F64 = torch.float64


def fp8(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(torch.float32).to(dtype)


def lamb_reference(
    param: Tensor,
    grads: list[Tensor],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    adam: bool = False,
    bias_correction: bool = False,
    max_weight_norm: float | None = 10.0,
) -> dict[str, Tensor]:
    b1, b2 = betas
    p = param.to(F64)
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.to(F64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_used, v_used = (m / (1 - b1**t), v / (1 - b2**t)) if bias_correction else (m, v)
        w_norm = p.norm() if max_weight_norm is None else torch.clamp(p.norm(), max=max_weight_norm)
        u = m_used / (v_used.sqrt() + eps) + weight_decay * p
        u_norm = u.norm()
        trust = torch.tensor(1.0, dtype=F64)
        if not adam and w_norm > 0 and u_norm > 0:
            trust = w_norm / u_norm
        p = p - lr * trust * u
    return dict(param=p, exp_avg=m, exp_avg_sq=v, weight_norm=w_norm, adam_norm=u_norm, trust_ratio=trust)


def lamb16_reference(
    param: Tensor,
    grads: list[Tensor],
    *,
    lr: float,
    scaling: str,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    trust_scale: float = 0.382,
    block_size: int = 256,
) -> dict[str, Tensor]:
    b1, b2 = betas
    n = param.numel()
    p = param.to(F64)
    m8 = torch.zeros_like(param, dtype=torch.float8_e4m3fn)
    v8 = torch.zeros_like(param, dtype=torch.float8_e5m2)
    if scaling == "block":  # a scale per block_size elements of each dim-0 slice (contiguous tensors here)
        rows = param.shape[0] if param.dim() >= 2 else 1
        blocks = -(-(n // rows) // block_size)
        m_scale = torch.ones(rows, blocks, dtype=F64)
        v_scale = torch.ones(rows, blocks, dtype=F64)
    else:
        m_scale = torch.tensor(1.0, dtype=F64)
        v_scale = torch.tensor(1.0, dtype=F64)
    for g in grads:
        g = g.to(F64)
        if scaling == "block":
            m = (m8.to(F64).reshape(rows, -1) * per_element(m_scale, block_size, n // rows)).reshape(param.shape)
            v = (v8.to(F64).reshape(rows, -1) * per_element(v_scale, block_size, n // rows)).reshape(param.shape)
        else:
            m = m8.to(F64) * m_scale
            v = v8.to(F64) * v_scale
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        if scaling == "block":
            tiny = torch.finfo(torch.float32).tiny
            m_rows, v_rows = m.reshape(rows, -1), v.reshape(rows, -1)
            for k in range(blocks):
                columns = slice(k * block_size, (k + 1) * block_size)
                m_scale[:, k] = torch.clamp(m_rows[:, columns].abs().amax(1) / 448.0, min=tiny)
                v_scale[:, k] = torch.clamp(v_rows[:, columns].abs().amax(1) / 57344.0, min=tiny)
            m_scaled = m_rows / per_element(m_scale, block_size, n // rows)
            v_scaled = v_rows / per_element(v_scale, block_size, n // rows)
            m8 = fp8(torch.clamp(m_scaled, -448.0, 448.0), torch.float8_e4m3fn).reshape(param.shape)
            v8 = fp8(torch.clamp(v_scaled, 2.0**-16, 57344.0), torch.float8_e5m2).reshape(param.shape)
        elif scaling == "seed":
            m_scale = torch.sqrt(torch.sum(torch.clamp(m * m, 0, 10))) / n + eps
            v_scale = torch.sqrt(torch.sum(torch.clamp(v * v, 0, 10))) / n + eps
            m8 = fp8(torch.clamp(m / m_scale, -15, 15), torch.float8_e4m3fn)
            v8 = fp8(torch.clamp(v, 0, 10) / v_scale, torch.float8_e5m2)
        else:  # absmax: the largest magnitude maps to the format's max; v never flushes to 0
            tiny = torch.finfo(torch.float32).tiny
            m_scale = torch.clamp(m.abs().max() / 448.0, min=tiny)
            v_scale = torch.clamp(v.max() / 57344.0, min=tiny)
            m8 = fp8(torch.clamp(m / m_scale, -448.0, 448.0), torch.float8_e4m3fn)
            v8 = fp8(torch.clamp(v / v_scale, 2.0**-16, 57344.0), torch.float8_e5m2)
        w_norm = torch.sqrt(torch.sum(torch.clamp(p * p, eps, 1))) / n
        u = m / (torch.sqrt(v) + eps) + weight_decay * p
        u_norm = torch.sqrt(torch.sum(torch.clamp(u * u, eps, 1))) / n
        trust = torch.clamp((w_norm / u_norm / lr * 1e-3) ** trust_scale, 0, 2)
        p = p - lr * trust * u
    return dict(
        param=p,
        exp_avg=m8,
        exp_avg_sq=v8,
        exp_avg_scale=m_scale,
        exp_avg_sq_scale=v_scale,
        weight_norm=w_norm,
        adam_norm=u_norm,
        trust_ratio=trust,
    )


def per_element(scales: Tensor, block_size: int, length: int) -> Tensor:
    """A (rows, blocks) grid of block scales spread over the (rows, length) elements they scale."""
    return scales.repeat_interleave(block_size, dim=1)[:, :length]
