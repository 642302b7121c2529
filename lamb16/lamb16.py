"""LAMB16: LAMB with its per-element moments stored in float8, and a learning-rate-aware trust ratio."""

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import native, plans, sharded, triton_kernels
from ._common import (
    CheckedOptimizer,
    check_flag,
    Job,
    adam_hyperparameters,
    init_step_and_statistics,
    in_layout_of,
    is_dtensor,
    lies_as_state,
    local_piece,
    stepped_states,
    with_gradients,
)
from .dispatch import PATH_NAMES, by_kernels, counted, run_reference, run_updates
from .quantize import (
    E4M3,
    E5M2,
    SCALINGS,
    absmax_scales_from_maxima,
    block_grid,
)
from .updates import (
    CARRY,
    COMBINE,
    DEFAULT_BLOCK_SIZE,
    Number,
    PARTIALS,
    TRUST_LRS,
    lamb16_apply,
    lamb16_block_apply,
    lamb16_block_partials,
    lamb16_block_single_pass_update,
    lamb16_block_update,
    lamb16_finish,
    lamb16_partials,
    lamb16_single_pass_update,
    lamb16_update,
    norms_and_trust,
    stats_after_exact_step,
    weight_norm_of,
)

def lamb16_sharded_steps(
    jobs: list[Job], params: list[Tensor], fused: bool | None, *, lr: float, trust_lr: float, beta1: float,
    beta2: float, eps: float, weight_decay: float, trust_scale: float, scaling: str,
) -> None:
    """lamb16_update() of DTensor parameters, each job on this process's pieces:
    pass 1, the partials combined over the shards (one collective per process
    group), finished as for a whole tensor, then pass 2 (lamb16.sharded)."""
    moments = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, scaling=scaling)
    taken = sharded.on_kernels(jobs, fused, "lamb16_partials")
    partials = sharded.first_pass(lamb16_partials, "lamb16_partials", jobs, fused, taken, len(PARTIALS), **moments)
    partials = sharded.combine_over_shards(partials, params, COMBINE[scaling])
    numel = torch.tensor([float(p.numel()) for p in params], device=partials.device)
    results = lamb16_finish(partials, numel, trust_lr=trust_lr, eps=eps, trust_scale=trust_scale, scaling=scaling)
    # The outputs' values (new scales, norms, trust ratio), then the step size; pass 2 takes columns 0, 1, 5.
    finished = torch.stack([*results, results[4] * lr], dim=1)
    sharded.second_pass(lamb16_apply, "lamb16_applies", jobs, fused, taken, finished, [0, 1, 5], **moments)



def check_block_placements(param: Tensor) -> None:
    """Block scales lie within rows: a sharded tensor of two or more dims must
    be cut between rows (Shard(0), as FSDP2's fully_shard cuts), and a 1-D one
    into one range per process (which may cut a block: its pieces combine
    their blocks' maxima)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    cuts = [p for p in param.placements if isinstance(p, Shard)]
    rows_cut = param.dim() >= 2 and all(p.dim == 0 for p in cuts)
    if rows_cut or (param.dim() <= 1 and len(cuts) <= 1 and not any(isinstance(p, _StridedShard) for p in cuts)):
        return
    raise ValueError(
        f"Lamb16(scaling='block') keeps a scale per block of a row, so a sharded parameter must be cut between rows "
        f"(Shard(0), as FSDP2 does); got a parameter of shape {tuple(param.shape)} with placements "
        f"{param.placements}. Put it in a parameter group with scaling='absmax', or shard it on dim 0"
    )


def lamb16_block_sharded_steps(
    jobs: list[Job], params: list[Tensor], fused: bool | None, *, lr: float, trust_lr: float, beta1: float,
    beta2: float, eps: float, weight_decay: float, trust_scale: float, block_size: int,
) -> None:
    """lamb16_block_update() of DTensor parameters, each job on this process's
    pieces. A piece of whole rows (FSDP2's cut of any tensor of two or more
    dims) holds whole blocks, and finds their scales alone, as an unsharded
    step does; a piece of a sharded 1-D tensor may hold parts of the blocks at
    its ends, so every piece's blocks' maxima are combined over the shards with
    the square sums (in the same one all-gather per process group), and each
    process keeps that tensor's whole grid of scales."""
    moments = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, block_size=block_size)
    cuts = [sharded.split_piece(param, block_size) for param in params]
    taken = sharded.on_kernels(jobs, fused, "lamb16_block_partials", [i for i in range(len(jobs)) if cuts[i] is None])
    device = jobs[0][0][0].device
    sums = torch.zeros(len(jobs), 2, device=device)
    for kernels, rows in list(taken.items()):
        try:
            sums[rows] = kernels.lamb16_block_partials([jobs[i] for i in rows], **moments).to(device)
        except triton_kernels.Unavailable:
            del taken[kernels]
            continue
        counted(PATH_NAMES[kernels], len(rows))
    on_kernels = {i for rows in taken.values() for i in rows}
    local_maxima: dict[int, tuple[Tensor, Tensor]] = {}  # pieces of whole rows, on the reference
    vectors, maxima = [], []
    for i, (inputs, outputs, _) in enumerate(jobs):
        grid = outputs[0].shape
        whole = torch.zeros(2, *grid, device=device) if cuts[i] is not None else None
        if i not in on_kernels and inputs[0].numel():
            if cuts[i] is None:
                sums[i], m_max, v_max = run_reference(lamb16_block_partials, inputs, fused, **moments)
                local_maxima[i] = (m_max, v_max)
            else:
                first, phase = cuts[i]
                blocks = slice(first, first + -(-(phase + inputs[0].numel()) // block_size))
                piece_inputs = (*inputs[:4], inputs[4][:, blocks], inputs[5][:, blocks])
                sums[i], m_max, v_max = run_reference(lamb16_block_partials, piece_inputs, fused, **moments,
                                                      phase=phase)
                whole[0][:, blocks], whole[1][:, blocks] = m_max, v_max
        parts = [sums[i]] if whole is None else [sums[i], whole.flatten()]
        vectors.append(torch.cat(parts))
        maxima.append(torch.arange(len(vectors[-1]), device=device) >= 2)
    combined = sharded.combine_vectors(vectors, maxima, params)
    finished = []
    for param, vector in zip(params, combined):
        finished.append(torch.stack([*norms_and_trust(vector[0], vector[1], param.numel(), trust_lr, trust_scale)]))
    finished = torch.stack(finished)
    finished = torch.cat([finished, finished[:, 2:3] * lr], dim=1)  # weight_norm, adam_norm, trust, step size
    for kernels, rows in taken.items():
        try:
            kernels.lamb16_block_applies([jobs[i] for i in rows], finished[rows], **moments)
        except triton_kernels.Unavailable:  # their maxima, for the reference's writes
            for i in rows:
                local_maxima[i] = run_reference(lamb16_block_partials, jobs[i][0], fused, **moments)[1:]
            on_kernels -= set(rows)
    for i, (inputs, outputs, _) in enumerate(jobs):
        if i in on_kernels:
            continue
        step_size = finished[i, 3]
        if cuts[i] is None:
            if i in local_maxima:
                scales = absmax_scales_from_maxima(*local_maxima[i])
                run_reference(lamb16_block_apply, (*inputs, *scales, step_size), fused, **moments)
                outputs[0].copy_(scales[0]), outputs[1].copy_(scales[1])
        else:
            whole_scales = absmax_scales_from_maxima(*combined[i][2:].view(2, *outputs[0].shape).unbind())
            if inputs[0].numel():
                first, phase = cuts[i]
                blocks = slice(first, first + -(-(phase + inputs[0].numel()) // block_size))
                run_reference(lamb16_block_apply, (*inputs[:4], inputs[4][:, blocks], inputs[5][:, blocks],
                                                   whole_scales[0][:, blocks], whole_scales[1][:, blocks], step_size),
                              fused, **moments, phase=phase)
            outputs[0].copy_(whole_scales[0]), outputs[1].copy_(whole_scales[1])
        for output, value in zip(outputs[2:], finished[i, :3]):
            output.copy_(value)


class Lamb16(CheckedOptimizer):
    """LAMB16: LAMB whose Adam moments take 16 bits per parameter instead of 64.

    The first moment is stored as float8_e4m3fn and the second as float8_e5m2,
    with float32 scales per block of 256 elements: about a quarter of Adam's or
    LAMB's state memory (2.03 bytes a parameter), with per-element adaptive
    learning rates kept (unlike factored optimizers). The trust ratio is
    learning-rate aware: clamp(((||w|| / ||u||) * 1e-3 / lr) ** trust_scale,
    0, 2), with both norms taken as sqrt(sum(clamp(x*x, eps, 1))) / n, over the
    whole tensor. No bias correction.

    Use it in place of Adam or LAMB where optimizer state memory matters, and
    for large batches with learning rates far from 1e-3. Parameters must be
    float32 (no AMP needed).

    scaling: "block" (default) gives every block_size consecutive elements of
        a row (a dim-0 slice, in memory order; a tensor of fewer than two dims
        is one row) their own pair of scales, each block's largest |m| and |v|
        at the top of the fp8 ranges: values many decades below the tensor's
        largest (rare embedding rows, a part of a tensor whose gradients fall
        while another's hold) keep fp8's resolution. "absmax" keeps one pair per
        tensor (2 bytes a parameter), which flushes moments more than about
        1e-5 below the tensor's largest to zero (`python cli.py widerange`);
        "seed" is the original proof-of-concept's arithmetic, which saturates
        the first moment of large tensors (kept to reproduce its figures).
    block_size: elements per block with scaling="block" (default 256: 8 / 256
        bytes of scales an element); a row shorter than it is one block.
        Sharded (DTensor) parameters must be cut between rows, as FSDP2 cuts
        them; their blocks' scales then equal the unsharded step's.
    single_pass: False (default) takes the exact step, in two passes over
        memory: its trust ratio is a reduction over the whole tensor, known only
        after reading it (absmax and seed scales too). True reads the weights,
        gradient and codes once, and takes the last step's update norm in the
        trust ratio in place of this step's (the weight norm stays exact). With
        block scales that is its one difference from the exact step: each
        block's scales come from its own moments while it is in cache. With
        per-tensor scales, the scales also come before the moments: absmax ones
        from exact bounds on this step's largest |m| and v (nothing saturates,
        but the largest element may sit a little below the top of the fp8
        range; a read of the gradient for its absmax comes first), seed ones
        from the last step's moments. A tensor's first step is exact. The weight
        norm is that of the weights the last step wrote, recomputed whenever
        anything else changed them (the parameter's version counter tells; a
        change through `.data` escapes it: call `refresh_weight_norms()` after
        one). DTensor parameters (FSDP2) always take the exact step.
    fused: None (default) or True runs the update fused: on the CPU, C++
        kernels built once per machine (lamb16.native), whose exact step with
        block scales keeps the update between its two passes (up to 16 MB,
        reused from step to step); on CUDA, Triton kernels (lamb16.triton_kernels:
        a group's tensors in three launches, nothing allocated beyond a few
        partial sums); elsewhere, the reference compiled by torch.compile, a few
        calls per parameter group (lamb16.compiled). Each falls back to the next
        with one warning where it cannot build or compile, True included (a
        device without a fast path still trains); False always runs the eager
        reference.

    maximize: True climbs the objective instead, as torch.optim.Adam's does
        (the gradients negated in place for the step, and back after it).

    A parameter whose memory layout changes between steps (a model moved to
    channels_last) is stepped as if it had not: its state keeps the layout it
    was made in, and the step walks copies of that tensor's weights and
    gradient in it.

    lr may be a float or a one-element tensor of any shape (a scheduler may
    change it in place). state["step"] is a float32 0-dim tensor, as torch's
    own optimizers keep it; a state_dict never holds a Python-number counter.
    Everything a step needs lives in `state` and `param_groups`, so
    state_dict()/load_state_dict() (load as often as you like, hooks run in
    torch's order), copy.deepcopy and torch.save of the optimizer all continue
    bit for bit.

    After each step, `optimizer.state[p]` holds `weight_norm`, `adam_norm` and
    `trust_ratio` of that step as 0-dim tensors, for logging (updated in place, as
    the moments are: keep `.item()` for a history).
    """

    element_state = {"exp_avg": E4M3, "exp_avg_sq": E5M2}
    scalar_state = ("step", "weight_norm", "adam_norm", "trust_ratio")
    vector_state = {"carry": len(CARRY)}
    shaped_state = ("exp_avg_scale", "exp_avg_sq_scale")  # 0-dim, or a grid with scaling="block"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        trust_scale: float = 0.382,
        scaling: str = "block",
        single_pass: bool = False,
        trust_lr: str = "scheduled",
        block_size: int = DEFAULT_BLOCK_SIZE,
        fused: bool | None = None,
        *,
        maximize: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            trust_scale=trust_scale,
            scaling=scaling,
            single_pass=single_pass,
            trust_lr=trust_lr,
            block_size=block_size,
            fused=fused,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    def check_group(self, group: dict[str, Any]) -> None:
        super().check_group(group)
        if not 0.0 <= group["trust_scale"]:
            raise ValueError(f"Invalid trust_scale value: {group['trust_scale']} (must be >= 0)")
        if group["scaling"] not in SCALINGS:
            raise ValueError(f"Invalid scaling: {group['scaling']!r} (choose one of {', '.join(SCALINGS)})")
        check_flag("single_pass", group["single_pass"])
        if group["trust_lr"] not in TRUST_LRS:
            raise ValueError(f"Invalid trust_lr: {group['trust_lr']!r} (choose one of {', '.join(TRUST_LRS)})")
        block_size = group["block_size"]
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"Invalid block_size value: {block_size!r} (must be an int >= 1)")
        if group["scaling"] == "block":
            for param in group["params"]:
                if is_dtensor(param):
                    check_block_placements(param)

    def check_state(self, state: dict[str, Any], param: Tensor, group: dict[str, Any]) -> None:
        super().check_state(state, param, group)
        block = group["scaling"] == "block"
        expected = block_grid(tuple(param.shape), group["block_size"]) if block else ()
        for key in self.shaped_state:
            value = state.get(key)
            if not isinstance(value, Tensor) or value.dtype != torch.float32:
                raise ValueError(f"Lamb16: state {key!r} is missing or not float32; start from a fresh optimizer")
            if tuple(value.shape) != expected:
                found = "one scale per tensor" if value.dim() == 0 else f"scales of shape {tuple(value.shape)}"
                wanted = (f"the {expected} grid of scaling='block' with block_size={group['block_size']}" if block
                          else f"the one scale of scaling={group['scaling']!r}")
                raise ValueError(
                    f"Lamb16: state {key!r} of a parameter of shape {tuple(param.shape)} holds {found}, not {wanted}: "
                    "the group's scaling or block_size changed after its state was made. Keep them for the whole "
                    "run (a state_dict brings back the ones it was saved with), or start from a fresh optimizer"
                )
            if block and is_dtensor(param) and param.dim() >= 2 and (
                not is_dtensor(value) or value.placements != param.placements
            ):
                raise ValueError(
                    f"Lamb16: state {key!r} of a DTensor parameter of shape {tuple(param.shape)} is not sharded as "
                    "its parameter; load sharded state with torch.distributed.checkpoint (set_optimizer_state_dict), "
                    "or start from a fresh optimizer"
                )

    @property
    def carried(self) -> dict[Tensor, int | None]:
        """The parameters whose carry their last step wrote (its state["carry"][3]
        is 1), each with its version counter right after (None: unknown, as after
        load_state_dict). Kept here so that no step has to read the device."""
        return self.__dict__.setdefault("_carried", {})

    def refresh_weight_norms(self) -> None:
        """Have the next single-pass step recompute every weight norm: needed only
        after a change to the weights that their version counters miss (`.data`)."""
        for param in self.carried:
            self.carried[param] = None

    def state_installed(self) -> None:
        # Optimizer.load_state_dict casts floating-point state to the parameter's
        # dtype, which would turn the fp8 moments into float32 (4x the memory).
        # fp8 -> float32 -> fp8 is exact, so casting back loses nothing.
        self.carried.clear()
        self.kernel_plans.clear()
        for group in self.param_groups:
            group.setdefault("single_pass", False)  # saved before the option existed
            group.setdefault("trust_lr", "scheduled")
            group.setdefault("block_size", DEFAULT_BLOCK_SIZE)
        for param, state in self.state.items():
            if not isinstance(state, dict) or "exp_avg" not in state:
                continue
            state["exp_avg"] = state["exp_avg"].to(E4M3)
            state["exp_avg_sq"] = state["exp_avg_sq"].to(E5M2)
            if "carry" not in state:  # saved before the single-pass step existed
                state["carry"] = new_carry(param)
            elif state["carry"][3].item() > 0:  # the weights it was written for may not be these
                self.carried[param] = None
            if is_dtensor(param) and param.dim() >= 2:
                for key in self.shaped_state:
                    state[key] = rows_of_whole_grid(state.get(key), param)


    @property
    def kernel_plans(self) -> dict[int, plans.Plan]:
        """Each group's kernel table from its last step, by the group's index
        (lamb16.plans); not saved, and dropped wherever state comes in."""
        return self.__dict__.setdefault("_plans", {})

    def update_groups(self) -> None:
        # Every group is checked before any is stepped: a step runs whole or raises before it has written.
        work = []
        for index, group in enumerate(self.param_groups):
            params = with_gradients(group)
            plan = self.kernel_plans.get(index)
            if plan is None or not self.plan_holds(plan, group, params):
                self.kernel_plans.pop(index, None)
                self.check_params(group, params)
                plan = None
            work.append((index, group, params, plan))
        for index, group, params, plan in work:
            hyper = lamb16_hyperparameters(group)
            if plan is not None:
                torch._foreach_add_(plan.steps, 1.0)
                native.run_lamb16(plan.kernel, plan.table, len(plan.params), **hyper)
                counted("cpu kernels", len(plan.params))
                if group["single_pass"]:
                    for param in params:
                        self.carried[param] = param._version
            else:
                self.step_group(index, group, params, hyper)

    def plan_holds(self, plan: plans.Plan, group: dict[str, Any], params: list[Tensor]) -> bool:
        """A group's plan holds where nothing it depends on changed, and, for a
        single pass, no weights changed since it carried their norms."""
        if not plans.ready(plan, group, params, self.state):
            return False
        return not group["single_pass"] or all(self.carried.get(p) == p._version for p in params)

    def step_group(self, index: int, group: dict[str, Any], params: list[Tensor], hyper: dict[str, Any]) -> None:
        """A group's full step: each tensor to the path that can take it, and a
        plan for the next step where one kernel took every tensor."""
        block = group["scaling"] == "block"
        # A tensor's first step is exact: nothing carried yet.
        fresh = {param for param in params if not self.state.get(param)} if group["single_pass"] else set()
        exact_jobs: list[Job] = []
        single_jobs: list[Job] = []
        sharded_jobs: list[Job] = []
        states = []
        carrying: set[Tensor] = set()  # the parameters taking a single-pass step
        relaid: list[tuple[Tensor, Tensor]] = []  # (parameter, its copy in its state's layout)
        for param, state in stepped_states(self, params, lambda state, param: init_state(state, param, group)):
            states.append(state)
            m_scale, v_scale = (local_piece(state[key]) for key in ("exp_avg_scale", "exp_avg_sq_scale"))
            pieces = [local_piece(t) for t in (param, param.grad, state["exp_avg"], state["exp_avg_sq"])]
            # The new scales replace the old in place; then the step's statistics.
            outputs = (m_scale, v_scale, state["weight_norm"], state["adam_norm"], state["trust_ratio"])
            if not is_dtensor(param) and not lies_as_state(pieces):  # the layout moved since the state was made
                pieces[:2] = [in_layout_of(pieces[2], t) for t in pieces[:2]]
                relaid.append((param, pieces[0]))
            if is_dtensor(param):
                sharded_jobs.append(((*pieces, m_scale, v_scale), outputs, {}))
            elif group["single_pass"] and param not in fresh:
                carry = state["carry"]
                carrying.add(pieces[0])
                single_jobs.append(((*pieces, m_scale, v_scale, carry, state["adam_norm"]), (*outputs, carry), {}))
            else:
                exact_jobs.append(((*pieces, m_scale, v_scale), outputs, {}))
        if self.carried and len(carrying) < len(params):
            self.forget_carries({param for param in params if param not in carrying and param not in dict(relaid)})
        prefix = "lamb16_block" if block else "lamb16"
        exact, single = f"{prefix}_steps", f"{prefix}_single_pass_steps"  # the kernels' names
        if block:
            references, sharded_steps = (lamb16_block_update, lamb16_block_single_pass_update), lamb16_block_sharded_steps
        else:
            references, sharded_steps = (lamb16_update, lamb16_single_pass_update), lamb16_sharded_steps
        on_native = run_updates(references[0], exact, exact_jobs, group["fused"], **hyper)
        if single_jobs:
            self.prepare_carries(single_jobs, group["fused"], group, {id(copy): param for param, copy in relaid})
            on_native += run_updates(references[1], single, single_jobs, group["fused"], **hyper)
            for (inputs, _, _) in single_jobs:
                self.carried[inputs[0]] = inputs[0]._version
        if sharded_jobs:
            sharded_params = [p for p in params if is_dtensor(p)]
            sharded_steps(sharded_jobs, sharded_params, group["fused"], **hyper)
        for param, copy in relaid:
            param.copy_(copy)
            if self.carried.pop(copy, None) is not None:  # a single pass carried it: its weights are the parameter's
                self.carried[param] = param._version
        jobs = single_jobs if group["single_pass"] else exact_jobs
        if params and on_native == len(params) == len(jobs) and not relaid:  # one kernel took them all
            kernel = single if group["single_pass"] else exact
            self.kernel_plans[index] = plans.make_plan(group, kernel, jobs, native.LAMB16_TABLES[kernel](jobs), states)

    def forget_carries(self, exact: set[Tensor]) -> None:
        """Parameters about to take an exact step, which writes no carry: theirs goes stale."""
        for param in [p for p in self.carried if p in exact]:
            del self.carried[param]
            self.state[param]["carry"][3] = 0.0

    def prepare_carries(self, jobs: list[Job], fused: bool | None, group: dict[str, Any],
                        owners: dict[int, Tensor]) -> None:
        """Make every job's carry right for its step: after an exact step (no
        carry written), the moment statistics it stored (block scales need
        none) and the weight norm; where something else changed the weights
        since, the weight norm. `owners`: the parameter of each copy a job
        walks in its state's layout, by the copy's id."""
        stale = []
        block_size = group["block_size"] if group["scaling"] == "block" else 0
        for job in jobs:
            weights, _, _, _, m_scale, v_scale, carry, _ = job[0]
            param = owners.get(id(weights), weights)
            if param not in self.carried:
                if not block_size:
                    carry[1:3] = torch.stack(stats_after_exact_step(m_scale, v_scale, group["scaling"]))
                carry[3] = 1.0
            if self.carried.get(param) != param._version:
                stale.append(job)
        if stale:
            refresh_weight_norms(stale, fused, group["eps"], block_size)


def refresh_weight_norms(jobs: list[Job], fused: bool | None, eps: float, block_size: int) -> None:
    """Write the weight norm of each single-pass job's weights into its carry,
    by the same arithmetic as the step that writes it (so that a resumed run
    recomputes the very bits an uninterrupted one carried); block_size 0 for
    scales per tensor."""
    done: set[int] = set()
    for kernels, rows in by_kernels(jobs, fused, "lamb16_weight_norms").items():
        try:
            kernels.lamb16_weight_norms([jobs[i] for i in rows], eps=eps, block_size=block_size)
        except triton_kernels.Unavailable:
            continue
        done.update(rows)
    for i, (inputs, _, _) in enumerate(jobs):
        if i not in done:
            inputs[6][0] = weight_norm_of(inputs[0], eps)


def lamb16_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """A group's hyperparameters, as every update of its scaling takes them."""
    hyper = adam_hyperparameters(group)
    hyper.update(trust_scale=group["trust_scale"], trust_lr=trust_lr_of(group, hyper["lr"]))
    hyper.update({"block_size": group["block_size"]} if group["scaling"] == "block" else {"scaling": group["scaling"]})
    return hyper


def trust_lr_of(group: dict[str, Any], lr: Number) -> Number:
    """The lr the trust ratio's factor 1e-3 / lr reads: the group's lr as it is
    now ("scheduled"), or the lr a scheduler started it from ("initial": torch's
    schedulers keep it as initial_lr), so that the schedule keeps its shape."""
    if group["trust_lr"] == "initial" and "initial_lr" in group:
        initial = group["initial_lr"]
        return initial.detach().reshape(()) if isinstance(initial, Tensor) else initial
    return lr


def new_carry(param: Tensor) -> Tensor:
    """A carry that no step has written (CARRY[3] = 0)."""
    return torch.zeros(len(CARRY), device=param.device)


def init_state(state: dict[str, Tensor], param: Tensor, group: dict[str, Any]) -> None:
    """Zero moments in fp8 and unit scales, as the first step expects; the step
    counter, the statistics and the single-pass carry."""
    init_step_and_statistics(state, param)
    # zeros_like of a DTensor is a DTensor placed as it is: state sharded as its parameter.
    state["exp_avg"] = torch.zeros_like(param, dtype=E4M3, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(param, dtype=E5M2, memory_format=torch.preserve_format)
    if group["scaling"] == "block":
        state["exp_avg_scale"] = ones_grid(param, group["block_size"])
        state["exp_avg_sq_scale"] = ones_grid(param, group["block_size"])
    else:
        state["exp_avg_scale"] = torch.ones((), device=param.device)
        state["exp_avg_sq_scale"] = torch.ones((), device=param.device)
    state["carry"] = new_carry(param)


def ones_grid(param: Tensor, block_size: int) -> Tensor:
    """Unit block scales for `param`: sharded as it is where it has rows to
    shard (two or more dims: each process keeps its own rows' scales), else a
    whole grid on every process (a 1-D tensor's cut may fall inside a block)."""
    shape = block_grid(tuple(param.shape), block_size)
    if is_dtensor(param) and param.dim() >= 2:
        from torch.distributed.tensor import ones

        return ones(shape, device_mesh=param.device_mesh, placements=param.placements)
    return torch.ones(shape, device=local_piece(param).device)


def rows_of_whole_grid(value: Any, param: Tensor) -> Any:
    """Block scales of a sharded parameter that came in whole (a whole-tensor
    checkpoint loaded into sharded training): this process's rows of them,
    sharded as the parameter is (each process cuts its own piece; nothing
    travels). Anything else as it is."""
    if not isinstance(value, Tensor) or is_dtensor(value) or value.dim() != 2 or value.shape[0] != param.shape[0]:
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(local_piece(param).device), param.device_mesh, param.placements,
                             src_data_rank=None)
