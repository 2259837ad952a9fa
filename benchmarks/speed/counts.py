"""What one call dispatches: compute ops, linear-algebra calls and host reads (``count_ops``, ``count_step``).

Every aten op is seen by a ``TorchDispatchMode`` after autograd and after the CompositeImplicitAutograd
decompositions (``torch.linalg.svd`` arrives as ``aten::_linalg_svd``, ``x.item()`` as
``aten::_local_scalar_dense``, ``torch.linalg.cholesky`` as ``linalg_cholesky_ex`` + ``_linalg_check_errors``).
Ops run by a kernel for another op are not seen again (the mode is off inside the call), so each op counted is
one call from Python/C++ into a kernel: on a GPU at least one launch (~5-10 µs of overhead each).

The rules, op by op (``func`` an ``OpOverload``):

* **view** (not counted as compute): ``func.is_view`` (the schema says the output aliases an input and nothing is
  written: view, t, transpose, permute, expand, slice, select, unsqueeze, squeeze, alias, detach, as_strided,
  diagonal, narrow, unbind, split, lift_fresh, ...; ``reshape`` when it is a view arrives as ``view``), or
  ``aten::_unsafe_view`` (metadata only, but not annotated as an alias). ``*_copy`` ops (``torch.Tag.view_copy``)
  and in-place ops (``add_``: they alias their input but write it) are compute.
* **compute op**: every other op, including copies, factories (``zeros``, ``empty``) and the host reads.
* **linear-algebra call**: a compute op named in ``LINALG`` or whose name starts with ``linalg_`` / ``_linalg_``,
  except plain kernels (``NOT_LINALG``: norms, matmul, cross, vecdot, ...) and ``_linalg_check_errors`` (a host
  read). Those in ``LINALG_SYNCS_ON_CUDA`` also copy status flags to the host inside the CUDA kernel
  (``docs``: integration-notes, "GPUs"); they are counted apart as ``linalg_syncing``, not as host reads.
* **host read** (an op whose result the host waits for): ``_local_scalar_dense`` (``item``, ``bool``, ``int``,
  ``float``), ops with a data-dependent output shape (``nonzero``, ``masked_select``, ``unique``, boolean-mask
  ``index`` / ``index_put_``, ...), ops returning a Python value computed from data (``equal``, ``allclose``,
  ``_linalg_check_errors``), and any op that copies a tensor from a non-CPU device to the CPU (``_to_copy`` /
  ``copy_``: ``.cpu()``, ``.to("cpu")``, ``.tolist()`` of a GPU tensor). On CPU ``.tolist()`` and ``.numpy()``
  dispatch nothing, so a ``TorchFunctionMode`` counts them there (on a GPU they show up as the copy to the CPU).
  On a CPU run every read counts (the CPU stands in for the GPU); on a GPU run a read whose inputs are all CPU
  tensors is a host-side table, not a sync: it goes to ``cpu_side_reads``, not to ``host_reads``.

On CUDA, ``count_ops`` also turns on ``torch.cuda.set_sync_debug_mode("warn")`` and counts the synchronising CUDA
calls it reports (``cuda_syncs``: host reads, explicit stream synchronisation, syncs inside linear algebra),
which no dispatch mode sees. Only the calling thread is seen (dispatch modes are thread-local); a CUDA-graph
replay dispatches nothing, so count with graphs off.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

METADATA_ONLY = frozenset({"_unsafe_view"})
LINALG = frozenset({
    "cholesky", "cholesky_solve", "_cholesky_solve_helper", "cholesky_inverse", "triangular_solve", "svd",
    "_svd_helper", "qr", "geqrf", "orgqr", "ormqr", "eig", "symeig", "lu_unpack", "lu_solve", "_lu_with_info",
    "lstsq", "inverse", "pinverse", "det", "logdet", "slogdet", "matrix_rank", "_linalg_eigvals"})
NOT_LINALG = frozenset({
    "linalg_vector_norm", "linalg_matrix_norm", "linalg_norm", "linalg_cross", "linalg_vecdot", "linalg_matmul",
    "linalg_multi_dot", "linalg_diagonal", "linalg_matrix_exp", "linalg_matrix_power", "_linalg_check_errors"})
LINALG_SYNCS_ON_CUDA = frozenset({"_linalg_svd", "svd", "_linalg_eigh", "linalg_eig", "linalg_eigvals",
                                  "linalg_lstsq", "linalg_matrix_rank"})
HOST_READS = frozenset({"_local_scalar_dense", "equal", "allclose", "_linalg_check_errors", "nonzero",
                        "argwhere", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                        "unique_dim_consecutive", "bincount", "histc"})
BOOL_MASK_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
TENSOR_METHOD_READS = {"tolist", "numpy"}   # dispatch nothing for a CPU tensor


def op_name(func) -> str:
    """``aten.linalg_qr.default`` -> ``linalg_qr``."""
    return func._schema.name.split("::")[-1]


def is_view(func) -> bool:
    return bool(getattr(func, "is_view", False)) or op_name(func) in METADATA_ONLY


def is_linalg(name: str) -> bool:
    return name not in NOT_LINALG and (name in LINALG or name.startswith(("linalg_", "_linalg_")))


def _tensors(tree) -> list[torch.Tensor]:
    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]


def host_read_kind(func, args, kwargs, out) -> str | None:
    """The host read ``func(*args, **kwargs) -> out`` makes (a label), or None."""
    name = op_name(func)
    if name in HOST_READS:
        return name
    if name in BOOL_MASK_OPS and any(i is not None and i.dtype in (torch.bool, torch.uint8)
                                     for i in _tensors(args[1] if len(args) > 1 else kwargs.get("indices"))):
        return f"{name}(bool mask)"
    inputs, outputs = _tensors((args, kwargs)), _tensors(out)
    if any(t.device.type != "cpu" for t in inputs) and any(t.device.type == "cpu" for t in outputs):
        return f"{name}(to cpu)"
    return None


@dataclass
class Counts:
    """What one call dispatched. ``ops``: every compute op by name; the others are subsets of it."""

    compute_ops: int = 0
    views: int = 0
    ops: Counter = field(default_factory=Counter)
    linalg: Counter = field(default_factory=Counter)
    linalg_syncing: Counter = field(default_factory=Counter)
    host_reads: Counter = field(default_factory=Counter)
    cpu_side_reads: Counter = field(default_factory=Counter)
    cuda_syncs: int | None = None          # CUDA runs only

    def as_dict(self) -> dict:
        return {"compute_ops": self.compute_ops, "linalg_calls": sum(self.linalg.values()),
                "host_reads": sum(self.host_reads.values()), "views": self.views, "cuda_syncs": self.cuda_syncs,
                "linalg": dict(sorted(self.linalg.items())),
                "linalg_syncing_on_cuda": dict(sorted(self.linalg_syncing.items())),
                "host_read_ops": dict(sorted(self.host_reads.items())),
                "cpu_side_reads": dict(sorted(self.cpu_side_reads.items())),
                "ops": dict(self.ops.most_common())}


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, counts: Counts, gpu_run: bool):
        super().__init__()
        self.counts, self.gpu_run = counts, gpu_run

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        c = self.counts
        if is_view(func):
            c.views += 1
            return out
        name = op_name(func)
        c.compute_ops += 1
        c.ops[name] += 1
        if is_linalg(name):
            c.linalg[name] += 1
        if name in LINALG_SYNCS_ON_CUDA:
            c.linalg_syncing[name] += 1
        kind = host_read_kind(func, args, kwargs, out)
        if kind is not None:
            on_host = all(t.device.type == "cpu" for t in _tensors((args, kwargs)))
            (c.cpu_side_reads if self.gpu_run and on_host else c.host_reads)[kind] += 1
        return out


class _MethodCounter(TorchFunctionMode):
    """``Tensor.tolist`` / ``.numpy`` of CPU tensors on a CPU run (invisible to the dispatch mode)."""

    def __init__(self, counts: Counts, gpu_run: bool):
        super().__init__()
        self.counts, self.gpu_run = counts, gpu_run

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if (name in TENSOR_METHOD_READS and args and isinstance(args[0], torch.Tensor)
                and args[0].device.type == "cpu"):
            (self.counts.cpu_side_reads if self.gpu_run else self.counts.host_reads)[name] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _cuda_syncs(device: torch.device, counts: Counts) -> Iterator[None]:
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    counts.cuda_syncs = sum("synchroniz" in str(w.message) for w in caught)


def count_ops(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[object, Counts]:
    """Run ``fn()`` once, counting what it dispatches; ``device``: where the computation runs (cpu or a GPU)."""
    counts = Counts()
    device = torch.device(device)
    gpu_run = device.type != "cpu"
    with _cuda_syncs(device, counts), _MethodCounter(counts, gpu_run), _DispatchCounter(counts, gpu_run):
        result = fn()
    return result, counts


def count_step(integrator, lr: float, device: torch.device | str | None = None) -> dict:
    """``Counts.as_dict()`` of one ``integrator.step(lr)``; gradients must already be set (``loss.backward()``).

    Returns ``{"compute_ops", "linalg_calls", "host_reads", "views", "linalg": {name: n}, "host_read_ops": ...,
    "linalg_syncing_on_cuda", "cpu_side_reads", "ops", "stepped": the step's return value (a tensor flag is
    read after the count, as a bool)}``.
    """
    if device is None:
        device = next(p.device for s in integrator.storages() for p in s.parameters())
    stepped, counts = count_ops(lambda: integrator.step(lr), device)
    if isinstance(stepped, torch.Tensor):          # a device flag (no host read in the step): read it after
        stepped = bool(stepped)
    return {**counts.as_dict(), "stepped": stepped}


def names(counter: dict) -> str:
    """``{'a': 2, 'b': 1}`` -> ``'a 2, b 1'`` (``'-'`` when empty)."""
    return ", ".join(f"{k} {v}" for k, v in counter.items()) or "-"


def format_counts(rows: list[tuple[str, dict]]) -> str:
    """A markdown table, one row per ``(label, count_step(...))``."""
    lines = ["| run | compute ops | linalg calls | host reads | linalg calls by name | host reads by name |",
             "|---|---:|---:|---:|---|---|"]
    for label, c in rows:
        lines.append(f"| {label} | {c['compute_ops']} | {c['linalg_calls']} | {c['host_reads']} | "
                     f"{names(c['linalg'])} | {names(c['host_read_ops'])} |")
    return "\n".join(lines)
