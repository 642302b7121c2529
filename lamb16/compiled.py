"""The fast path off the CPU: the reference updates, compiled by torch.compile.

A parameter group's updates run as a few compiled calls (`run_group`), each
over a chunk of its tensors with static shapes (a model's shapes do not
change), not one call per tensor: the host pays per call, and a GPU step is
short. Inductor's compile time grows with the tensors a graph holds, so the
chunks follow the model's repeating blocks (a transformer's layers): identical
chunks share one graph, and compiling a 12-layer model costs about one layer.
The hyperparameters go in as 0-dim tensors, so that a new learning rate is a
new input, not a new graph. With aggressive fusion, Inductor turns each
tensor's reference into its passes over memory (Triton kernels on CUDA, C++ on
the CPU).

`run_compiled` compiles one tensor's update at a time, with dynamic shapes
(one graph for every tensor, on flat aliases): the sharded step's passes take
it. Where it cannot compile (no C compiler, an unsupported device), the
optimizer falls back to the reference with one warning.
"""

import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._common import ELEMENTWISE, Job, same_dense_layout

_compiled: dict[Callable, Callable] = {}
_groups: dict[tuple, Callable] = {}  # a compiled group step per update, options and chunk signature
_plans: dict[tuple, list[tuple[int, int, tuple]]] = {}  # per update, options and group: its chunks
MAX_CHUNK = 32  # the most tensors a chunk takes, when no repetition makes chunks alike
_unavailable: str | None = None  # why compilation failed, once it has
_scalars: dict[tuple[float, torch.device], Tensor] = {}  # hyperparameters as graph inputs
MAX_GROUP_GRAPHS = 64  # past this many groups met in one process, older graphs are dropped


def laid_out_alike(tensors: tuple[Tensor, ...]) -> bool:
    """The per-element tensors walk as flat arrays alike, and the rest live on their device."""
    device = tensors[0].device
    return same_dense_layout(tensors[:ELEMENTWISE]) and all(t.device == device for t in tensors[ELEMENTWISE:])


def can_compile(tensors: tuple[Tensor, ...]) -> bool:
    """Whether one update can go through the per-tensor compiled path: laid out
    alike, and the parameter has more than one element (with dynamic shapes,
    torch.compile specializes sizes 0 and 1)."""
    return _unavailable is None and tensors[0].numel() > 1 and laid_out_alike(tensors)


def as_input(value: Any, like: Tensor) -> Any:
    """Floats become 0-dim float32 tensors (graph inputs, not constants to
    guard on); ints (a block size) shape the graph and stay as they are."""
    if isinstance(value, float):
        key = (float(value), like.device)
        if key not in _scalars:
            if len(_scalars) > 256:  # a scheduler makes a new lr every step
                _scalars.clear()
            _scalars[key] = torch.tensor(float(value), dtype=torch.float32, device=like.device)
        return _scalars[key]
    return value


def flat_alias(t: Tensor) -> Tensor:
    """A 1-D tensor on the same memory as dense `t`, in memory order. Not a view:
    torch.compile would guard on a view's base shape and recompile for every
    parameter shape."""
    if t.dim() == 0:
        return t
    alias = torch.empty(0, dtype=t.dtype, device=t.device)
    return alias.set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


def fall_back(error: Exception) -> None:
    """Compilation failed: warn once; from now on the reference runs eagerly."""
    global _unavailable
    _unavailable = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    warnings.warn(
        f"lamb16: compiling the fused step failed ({_unavailable}); using the reference "
        "implementation (pass fused=False to silence this)",
        RuntimeWarning,
        stacklevel=4,
    )


def run_compiled(update: Callable, reference_args: tuple[Tensor, ...], **hyper: Any) -> Any:
    """Call `update` compiled, on flat aliases of its per-element tensors; `hyper`
    holds floats (made 0-dim tensors) and static options (strings, bools, ints)."""
    if _unavailable is not None:  # already warned
        return update(*reference_args, **hyper)
    # The per-element tensors flat; the others (block scale grids among them) as they are.
    flat = tuple(flat_alias(t) if i < ELEMENTWISE else t for i, t in enumerate(reference_args))
    like = reference_args[0]
    kwargs = {k: as_input(v, like) for k, v in hyper.items()}
    compiled = _compiled.get(update)
    if compiled is None:
        compiled = _compiled[update] = torch.compile(
            update, dynamic=True, fullgraph=True, options={"aggressive_fusion": True}
        )
    try:
        return compiled(*flat, **kwargs)
    except Exception as error:  # a compiler or device that torch.compile cannot use
        fall_back(error)
        return update(*reference_args, **hyper)


def group_step(update: Callable, inputs: list[tuple], extras: list[dict], hyper: dict[str, Any]) -> list:
    """Every job of a group through its update (which writes the weights and
    moments in place), in one graph; the results come back for the caller to
    copy into their state tensors. Copying them inside the graph would be one
    launch fewer, but Inductor (torch 2.14) then fuses some copies after the
    writes they must precede: a result read from the carry came back as the new
    carry's value."""
    return [update(*job_inputs, **hyper, **extra) for job_inputs, extra in zip(inputs, extras)]


def compiled_group_step(key: tuple) -> Callable:
    """The compiled group step for `key`, compiled from a code object of its own:
    Dynamo keeps its graphs, and its limit on recompilations, per code object,
    so two kinds of chunks (or two models in one process) never evict each other's."""
    compiled = _groups.get(key)
    if compiled is None:
        if len(_groups) >= MAX_GROUP_GRAPHS:
            _groups.clear()
        step = types.FunctionType(group_step.__code__.replace(), group_step.__globals__, "group_step")
        compiled = _groups[key] = torch.compile(
            step, dynamic=False, fullgraph=True, options={"aggressive_fusion": True}
        )
    return compiled


def signature(job: Job) -> tuple:
    """What a job's graph depends on: its inputs' shapes, strides, dtypes and
    devices, and its extra arguments' names."""
    inputs, _, extra = job
    return tuple((t.shape, t.stride(), t.dtype, t.device) for t in inputs) + tuple(sorted(extra))


def chunks(signatures: list[tuple], limit: int = MAX_CHUNK) -> list[tuple[int, int]]:
    """How a group's jobs split into compiled calls, as (start, end) ranges:
    every period up to `limit` and every offset is tried, and the cheapest cut
    kept, counting a tensor traced for each distinct chunk (compile time) and
    one per chunk (host time per step). A model of repeated blocks is cut at
    its block's period into identical chunks; a small group stays whole."""
    n = len(signatures)
    best: tuple[int, list[tuple[int, int]]] | None = None
    for period in range(1, min(limit, n) + 1):
        for offset in range(min(period, n)):
            cut = ([(0, offset)] if offset else []) + [(a, min(a + period, n)) for a in range(offset, n, period)]
            traced = sum(len(kind) for kind in {tuple(signatures[a:b]) for a, b in cut})
            cost = traced + len(cut)
            if best is None or cost < best[0]:
                best = (cost, cut)
    return best[1] if best else []


def plan(update: Callable, statics: tuple, jobs: list[Job]) -> list[tuple[int, int, tuple]]:
    """A group's chunks, found once per group of tensors: (start, end, graph key)."""
    key = (update, statics, tuple(id(inputs[0]) for inputs, _, _ in jobs))
    found = _plans.get(key)
    if found is None:
        if len(_plans) >= MAX_GROUP_GRAPHS:
            _plans.clear()
        signatures = [signature(job) for job in jobs]
        found = _plans[key] = [(a, b, (update, statics, tuple(signatures[a:b]))) for a, b in chunks(signatures)]
    return found


def run_chunks(update: Callable, jobs: list[Job], hyper: dict[str, Any]) -> list:
    """Each job's results of `update`, in a few compiled calls (one per chunk);
    what does not run compiled (all, or the chunks after a failed compilation)
    runs eagerly."""
    results: list = []
    if _unavailable is None:
        statics = tuple(sorted((k, v) for k, v in hyper.items() if isinstance(v, (str, bool, int))))
        like = jobs[0][0][0]
        numbers = {k: as_input(v, like) for k, v in hyper.items()}
        for start, end, key in plan(update, statics, jobs):
            chunk = jobs[start:end]
            try:
                results += compiled_group_step(key)(
                    update,
                    [inputs for inputs, _, _ in chunk],
                    [{k: as_input(v, like) for k, v in extra.items()} for _, _, extra in chunk],
                    numbers,
                )
            except Exception as error:  # a compiler or device that torch.compile cannot use
                fall_back(error)
                break
    return results + [update(*inputs, **hyper, **extra) for inputs, _, extra in jobs[len(results):]]


def run_group(update: Callable, jobs: list[Job], **hyper: Any) -> None:
    """A group's `jobs` through `update` in a few compiled calls (one per chunk),
    and their results into the jobs' output tensors in one more; `hyper` as for
    run_compiled, and each job's extra keyword arguments (Lamb's step count)
    inputs as well. An update written in phases (`update.phases`: its
    reductions, each taking the earlier ones' results after the inputs, their
    results together the update's; then its writes, taking them all) runs as a
    graph for each."""
    phases = getattr(update, "phases", None)
    if phases is None:
        results = run_chunks(update, jobs, hyper)
    else:
        results = [()] * len(jobs)
        for phase in phases:
            found = run_chunks(phase, [(inputs + tuple(got), outputs, extra)
                                       for (inputs, outputs, extra), got in zip(jobs, results)], hyper)
            results = [(*got, *more) for got, more in zip(results, found)]
    outputs = [output for _, job_outputs, _ in jobs for output in job_outputs]
    torch._foreach_copy_(outputs, [result for job_results in results for result in job_results])


def compiles_on(device: torch.device) -> bool:
    """Where this path serves: every device but the CPU, where lamb16.native is faster (and meta)."""
    return device.type not in ("cpu", "meta")  # meta tensors hold no values: the reference checks their shapes


def usable(tensors: tuple[Tensor, ...], fused: bool | None) -> bool:
    """Whether one update runs compiled on its own: fused not False, off the
    CPU, and tensors the per-tensor graphs take."""
    return fused is not False and compiles_on(tensors[0].device) and can_compile(tensors)


def group_usable(tensors: tuple[Tensor, ...], fused: bool | None) -> bool:
    """Whether an update joins its group's compiled call: fused not False, off
    the CPU, and tensors laid out alike (any size, shapes being static)."""
    return fused is not False and _unavailable is None and compiles_on(tensors[0].device) and laid_out_alike(tensors)
