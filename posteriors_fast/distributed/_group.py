"""The process group of a data-parallel, sharded or many-chain run: how the
user names it, the agreement protocol every update runs before it writes, the
collectives (counted), and the noise streams.

Every data-parallel or sharded step runs in this order:

1. each rank computes its local part (its shard of the batch); an exception is
   caught, not raised;
2. one small all-gather of a header per rank, 6 int64 values: failed or not,
   the rank's number of samples and of rows to gather, a hash of what the
   rank runs (method, parameter structure, shapes and dtypes,
   hyperparameters) and, on the first step of a method on a group and at
   ``init``, an exact checksum of the parameter values;
3. if any rank failed, every rank raises the same :class:`RankError` (one
   all-gather of the messages, on the error path only); if the hashes or
   checksums differ, every rank raises the same :class:`MismatchError`;
4. only then the payload collectives run, and only then is anything written.

The methods whose payload is one all-reduce (diagonal methods, gradients)
fold steps 2-3 into it after their first step on a group: the failure flag
and the sample count ride in the payload as two more values, so a step is one
collective, and a failure still raises on every rank before anything is
written (the settings hash is then only checked on that first step).

Errors after step 4 come from identical inputs on every rank (the reduced or
gathered data are bit-identical everywhere), so every rank raises them
identically without another exchange. A rank that never reaches step 2
(crashed, killed, stuck in user code) makes the others wait for the process
group's timeout (``torch.distributed.init_process_group(timeout=...)``: 30
minutes by default for gloo, 10 for NCCL), after which they raise
:class:`CollectiveError`; the group is then unusable (destroy it).
"""

import contextlib
import hashlib
import importlib
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from optree import tree_flatten, tree_leaves, tree_unflatten

from posteriors_fast._internal.checks import common_leading_dim

MODES = ("data", "sharded", "chains")
REDUCTIONS = ("auto", "mean", "sum")
_SEED_HIGH = 2**62


class RankError(RuntimeError):
    """An update failed on one or more ranks; every rank of the group raises it.

    Attributes:
        rank: The first failing rank (in the group).
        failures: ``[(rank, error type name, message), ...]`` for every failing rank.
    """

    def __init__(self, message: str, rank: int = -1, failures: Sequence = ()):
        super().__init__(message)
        self.rank = rank
        self.failures = list(failures)


class MismatchError(ValueError):
    """The ranks run different things: parameter structure, shapes, dtypes,
    values (checked at ``init`` and the first step), hyperparameters or
    settings. Raised on every rank."""


class CollectiveError(RuntimeError):
    """A collective failed: a rank crashed, stopped or did not reach the same
    step within the process group's timeout. The group cannot be used again."""


_RANK_ERRORS: dict = {}


def _rank_error_class(original: type) -> type:
    """``RankError`` that is also an instance of the failing rank's error type
    (``ValueError``, ``TypeError``, ``CholeskyError``, ...), so code catching
    the one-process error keeps working."""
    if not isinstance(original, type) or not issubclass(original, Exception) or issubclass(original, RankError):
        return RankError
    if original not in _RANK_ERRORS:
        try:
            cls = type(f"RankError[{original.__name__}]", (RankError, original), {})
            cls("probe")  # an exception type whose constructor needs more than a message
        except Exception:
            cls = RankError
        _RANK_ERRORS[original] = cls
    return _RANK_ERRORS[original]


def _error_type(module: str, qualname: str) -> type:
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj if isinstance(obj, type) else RuntimeError
    except Exception:
        return RuntimeError


class CommStats:
    """Bytes and calls of the collectives this rank took part in.

    ``payload_bytes`` counts each collective's result buffer (what the
    caller gets); ``wire_bytes`` estimates what this rank receives on the
    wire with ring algorithms: ``2(R-1)/R·B`` for an all-reduce of ``B``
    bytes, ``(R-1)·b`` for an all-gather of ``b`` bytes per rank, ``B`` for a
    broadcast or reduce; ``seconds`` is the wall time spent inside the
    collectives (waiting for other ranks included).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.payload_bytes = 0
        self.wire_bytes = 0
        self.seconds = 0.0
        self.by_op: dict = {}

    def record(self, op: str, payload: int, wire: float, seconds: float = 0.0) -> None:
        self.calls += 1
        self.payload_bytes += int(payload)
        self.wire_bytes += int(wire)
        self.seconds += seconds
        calls, p, w = self.by_op.get(op, (0, 0, 0))
        self.by_op[op] = (calls + 1, p + int(payload), w + int(wire))

    def snapshot(self) -> dict:
        return {
            "calls": self.calls,
            "payload_bytes": self.payload_bytes,
            "wire_bytes": self.wire_bytes,
            "seconds": self.seconds,
            "by_op": dict(self.by_op),
        }


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class NoiseStream:
    """A reproducible stream of per-step seeds. ``seeded(device)`` seeds
    torch's default generators (CPU, and the device's when it is CUDA) with
    the stream's next seed for the duration of a block and then restores
    them, so the user's own random state is left as it was."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)

    def next_seed(self) -> int:
        return int(torch.randint(_SEED_HIGH, (), generator=self._gen))

    @contextlib.contextmanager
    def seeded(self, device: Optional[torch.device] = None):
        seed = self.next_seed()
        generators = [torch.default_generator]
        if device is not None and device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            generators.append(torch.cuda.default_generators[index])
        saved = [g.get_state() for g in generators]
        for g in generators:
            g.manual_seed(seed)
        try:
            yield seed
        finally:
            for g, state in zip(generators, saved):
                g.set_state(state)


def draw_seed() -> int:
    """A seed from torch's default generator (so ``torch.manual_seed`` on rank
    0 makes a run reproducible)."""
    return int(torch.randint(_SEED_HIGH, (), dtype=torch.int64))


def _checksum(params) -> int:
    """Exact checksum of the bits of every floating leaf: the sum and an
    index-weighted sum of the values read as integers (int64 arithmetic
    wraps), combined; equal parameters always give equal checksums."""
    total = 0
    for i, leaf in enumerate(tree_leaves(params)):
        if not isinstance(leaf, torch.Tensor) or leaf.numel() == 0:
            continue
        x = leaf.detach().contiguous().reshape(-1)
        ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        v = x.view(ints).to(torch.int64)
        weights = torch.arange(1, v.numel() + 1, device=v.device, dtype=torch.int64)
        a, b = torch.stack([v.sum(), (v * weights).sum()]).tolist()
        total = (total * 1_000_003 + a * 7 + b * 13 + i) % _SEED_HIGH
    return total


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


class Group:
    """A process group and how a method uses it. Make one with
    :func:`data_parallel`, :func:`sharded` or :func:`chains` (or pass a
    ``torch.distributed.ProcessGroup``, which means ``data_parallel(group)``).

    Attributes:
        mode: ``"data"``, ``"sharded"`` or ``"chains"``.
        reduction: ``"auto"``, ``"mean"`` or ``"sum"`` (see :func:`data_parallel`).
        rank: This process's rank in the group.
        size: Number of ranks R.
        stats: :class:`CommStats` of the collectives run through this object.
    """

    def __init__(self, group, mode: str, reduction: str = "auto", seed: Optional[int] = None, batch_size=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized: call torch.distributed.init_process_group "
                "first (torchrun sets up its environment), or pass process_group=None"
            )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if batch_size is not None and not callable(batch_size):
            raise TypeError("batch_size must be None or a function batch -> number of samples")
        self.pg = dist.group.WORLD if group is None else group
        self.mode = mode
        self.reduction = reduction
        self.seed = None if seed is None else int(seed)
        self.batch_size = batch_size
        self.rank = dist.get_rank(self.pg)
        self.size = dist.get_world_size(self.pg)
        if self.rank < 0:
            raise ValueError("this process is not a member of the given process group")
        backend = str(dist.get_backend(self.pg)).lower()
        self.device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        self.stats = CommStats()
        self._stream: Optional[NoiseStream] = None
        self._verified: set = set()  # what has passed a header exchange (signature and checksum)
        self._signature_cache: Tuple = (None, None, None)

    @property
    def sharded(self) -> bool:
        return self.mode == "sharded"

    def __repr__(self) -> str:
        return (
            f"posteriors_fast.distributed.Group(mode={self.mode!r}, reduction={self.reduction!r}, "
            f"rank={self.rank}, size={self.size})"
        )

    # ---- collectives (counted; failures become CollectiveError) -------------

    def _call(self, op: str, fn: Callable, payload: int, wire: float):
        start = time.perf_counter()
        try:
            out = fn()
        except RuntimeError as err:
            raise CollectiveError(
                f"{op} over the process group failed on rank {self.rank}: a rank crashed, stopped, or did not "
                "reach this step within the group's timeout (init_process_group(timeout=...)); "
                f"the group cannot be used again ({str(err).splitlines()[0][:300]})"
            ) from err
        self.stats.record(op, payload, wire, time.perf_counter() - start)
        return out

    def _to_comm(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.device else t.to(self.device)

    def _global(self, rank: int) -> int:
        return rank if self.pg is dist.group.WORLD else dist.get_global_rank(self.pg, rank)

    def all_reduce_(self, t: torch.Tensor, op=None) -> torch.Tensor:
        """In-place all-reduce (sum by default) of ``t``; returns ``t``."""
        if self.size == 1:
            return t
        op = dist.ReduceOp.SUM if op is None else op
        buf = self._to_comm(t.contiguous())
        b = _nbytes(buf)
        wire = 2 * (self.size - 1) / self.size * b
        self._call("all_reduce", lambda: dist.all_reduce(buf, op=op, group=self.pg), b, wire)
        if buf is not t:
            t.copy_(buf)
        return t

    def all_gather(self, t: torch.Tensor) -> List[torch.Tensor]:
        """Every rank's ``t`` (same shape and dtype on every rank), in rank order."""
        if self.size == 1:
            return [t]
        buf = self._to_comm(t.contiguous())
        outs = [torch.empty_like(buf) for _ in range(self.size)]
        b = _nbytes(buf)
        self._call("all_gather", lambda: dist.all_gather(outs, buf, group=self.pg), b * self.size, b * (self.size - 1))
        return [o if o.device == t.device else o.to(t.device) for o in outs]

    def broadcast_(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """In-place broadcast of ``t`` from group rank ``src``; returns ``t``."""
        if self.size == 1:
            return t
        buf = self._to_comm(t.contiguous())
        b = _nbytes(buf)
        self._call("broadcast", lambda: dist.broadcast(buf, src=self._global(src), group=self.pg), b, b)
        if buf is not t:
            t.copy_(buf)
        return t

    def reduce_(self, t: torch.Tensor, dst: int) -> torch.Tensor:
        """Sum of every rank's ``t`` written into ``t`` on group rank ``dst``
        (``t`` is scratch elsewhere); returns ``t``."""
        if self.size == 1:
            return t
        buf = self._to_comm(t.contiguous())
        b = _nbytes(buf)
        self._call("reduce", lambda: dist.reduce(buf, dst=self._global(dst), group=self.pg), b, b)
        if buf is not t:
            t.copy_(buf)
        return t

    def all_gather_object(self, obj) -> list:
        """Every rank's picklable ``obj``, in rank order (error paths and set-up only)."""
        if self.size == 1:
            return [obj]
        out: list = [None] * self.size
        self._call("all_gather_object", lambda: dist.all_gather_object(out, obj, group=self.pg), 0, 0)
        return out

    # ---- the agreement protocol ---------------------------------------------

    def local_rows(self, batch) -> Optional[int]:
        """This rank's number of samples: ``batch_size(batch)`` when given,
        else the leading dimension every tensor leaf of ``batch`` shares
        (None when there is none)."""
        if self.batch_size is not None:
            return int(self.batch_size(batch))
        return common_leading_dim(batch)

    def resolved_reduction(self, kind: str) -> str:
        """``"mean"`` or ``"sum"`` for a function of ``kind`` ``"scalar"`` (one
        log density or loss for the batch: mean by default) or ``"ggn"`` (an
        outer log-likelihood of the outputs: sum by default)."""
        if self.reduction != "auto":
            return self.reduction
        return "sum" if kind == "ggn" else "mean"

    def _signature(self, what: str, params, extra) -> Tuple[int, str]:
        leaves, spec = tree_flatten(params) if params is not None else ([], None)
        shapes = tuple((tuple(x.shape), str(x.dtype)) if isinstance(x, torch.Tensor) else repr(x) for x in leaves)
        key = (what, spec, shapes, repr(extra))
        if self._signature_cache[0] == key:
            return self._signature_cache[1], self._signature_cache[2]
        text = (
            f"{what}; mode={self.mode}, reduction={self.reduction}, world size {self.size}; "
            f"parameter structure {spec}; leaves (shape, dtype) {list(shapes)}; settings {extra!r}"
        )
        value = _hash(text)
        self._signature_cache = (key, value, text)
        return value, text

    def agree(
        self,
        compute: Optional[Callable],
        *,
        what: str,
        params=None,
        count: Any = None,
        rows: Any = None,
        extra: Any = (),
        check_values: bool = False,
    ) -> Tuple[Any, List[int], List[int]]:
        """Run ``compute()`` (None: nothing to run, e.g. an empty shard) and
        agree with every rank before anything is written.

        Args:
            compute: The local part; its exception is caught and shared.
            what: What runs, e.g. ``"ekf.dense_fisher.update"``, for messages.
            params: The parameters every rank must share (structure, shapes,
                dtypes; their values on the group's first step and when
                ``check_values``).
            count: This rank's number of samples: an int, or a function of
                the result.
            rows: This rank's number of rows to gather (default: ``count``),
                an int or a function of the result.
            extra: Settings every rank must share (hyperparameters), hashed.
            check_values: Compare the parameters' values now (``init``; the
                first step of ``what`` compares them again, with its settings).

        Returns:
            ``(result, counts, rows)``: the local result (None when ``compute``
            is None), every rank's number of samples and of rows, in rank order.

        Raises:
            RankError: some rank's ``compute`` raised (every rank raises it,
                naming that rank, its error type and message; the class is
                also a subclass of that error type).
            MismatchError: the ranks disagree on parameters or settings.
        """
        result, error = None, None
        if compute is not None:
            try:
                result = compute()
            except Exception as err:  # shared below; every rank raises the same error
                error = err
        n = m = 0
        if error is None:
            try:
                n = int(count(result)) if callable(count) else int(count or 0)
                m = n if rows is None else (int(rows(result)) if callable(rows) else int(rows))
            except Exception as err:
                error = err
        signature, description = self._signature(what, params, extra)
        digest = check_values or what not in self._verified
        checksum = 0
        if digest and params is not None and error is None:
            checksum = _checksum(params)
        header = torch.tensor(
            [int(error is not None), n, m, signature, int(digest and params is not None), checksum], dtype=torch.int64
        )
        table = torch.stack(self.all_gather(header)).tolist() if self.size > 1 else [header.tolist()]
        if any(r[0] for r in table):
            self._raise_failures(error, what)
        if len({r[3] for r in table}) > 1:
            self._raise_mismatch(description, what)
        if all(r[4] for r in table):
            sums = [r[5] for r in table]
            if len(set(sums)) > 1:
                differ = [i for i, s in enumerate(sums) if s != sums[0]]
                raise MismatchError(
                    f"{what}: the parameter values on rank(s) {differ} differ from rank 0's "
                    "(exact checksum of their bits): every rank must hold the same parameters. Start from "
                    "one seed, or copy rank 0's values with posteriors_fast.distributed.broadcast_(params, group)"
                )
            if not check_values:
                self._verified.add(what)
        return result, [r[1] for r in table], [r[2] for r in table]

    def _raise_failures(self, error: Optional[BaseException], what: str):
        info = None
        if error is not None:
            info = (type(error).__module__, type(error).__qualname__, str(error).strip())
        infos = self.all_gather_object(info)
        failures = [(r, f"{i[1]}", i[2]) for r, i in enumerate(infos) if i is not None]
        rank, name, message = failures[0]
        text = f"{what} failed on rank {rank} of {self.size}: {name}: {message}"
        if len(failures) > 1:
            others = ", ".join(f"rank {r} ({n})" for r, n, _ in failures[1:])
            text += f". Also failed: {others}"
        text += ". Every rank raised this error before writing anything."
        module, qualname = infos[rank][0], infos[rank][1]
        original = type(error) if error is not None and rank == self.rank else _error_type(module, qualname)
        cls = _rank_error_class(original)
        exc = cls(text)
        exc.rank, exc.failures = rank, failures
        raise exc from error

    def _raise_mismatch(self, description: str, what: str):
        texts = self.all_gather_object(description)
        differ = [r for r, t in enumerate(texts) if t != texts[0]]
        raise MismatchError(
            f"{what}: the ranks do not run the same thing. Rank 0: {texts[0]}. "
            + " ".join(f"Rank {r}: {texts[r]}." for r in differ)
        )

    def vote(self, ok: bool, what: str, message: str) -> None:
        """Every rank learns whether every rank's local check passed (one
        all-reduce of one value); if not, every rank raises ``ValueError``
        naming the ranks (the sharded updates' last check before writing)."""
        flags = self.all_gather(torch.tensor([0 if ok else 1], dtype=torch.int64))
        bad = [r for r, f in enumerate(flags) if int(f[0])]
        if bad:
            raise ValueError(f"{what}: {message} on rank(s) {bad}; no rank changed its state")

    def check_params(self, params, what: str, extra: Any = ()) -> None:
        """At ``init``: every rank holds parameters of the same structure,
        shapes, dtypes and values (one small all-gather)."""
        self.agree(None, what=what, params=params, extra=extra, check_values=True)

    # ---- data-parallel reductions -------------------------------------------

    def weights(self, counts: Sequence[int], kind: str) -> float:
        """This rank's weight w_r in Σ_r w_r x_r: n_r / N for the mean, 1 for the sum."""
        if self.resolved_reduction(kind) == "sum":
            return 1.0
        total = sum(counts)
        return counts[self.rank] / total if total else 0.0

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Sums over ranks of ``tensors`` (one all-reduce per dtype)."""
        out: List[Optional[torch.Tensor]] = [None] * len(tensors)
        groups: dict = {}
        for i, t in enumerate(tensors):
            groups.setdefault((t.dtype, t.device), []).append(i)
        for indices in groups.values():
            flat = torch.cat([tensors[i].reshape(-1) for i in indices])
            self.all_reduce_(flat)
            for i, part in zip(indices, flat.split([tensors[i].numel() for i in indices])):
                out[i] = part.view(tensors[i].shape)
        return out  # type: ignore[return-value]

    def gather_rows(self, rows: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """The (N, W) concatenation in rank order of every rank's (n_r, W)
        ``rows`` (uneven sizes: padded to the largest, one all-gather)."""
        if self.size == 1:
            return rows
        largest = max(counts)
        if largest == 0:
            return rows[:0]
        padded = rows.new_zeros((largest,) + tuple(rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        parts = self.all_gather(padded)
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    def gather_columns(self, block: torch.Tensor, widths: Sequence[int]) -> torch.Tensor:
        """The (K, Σ w_r) concatenation along columns of every rank's
        (K, w_r) ``block`` (one all-gather, padded to the widest)."""
        if self.size == 1:
            return block
        widest = max(widths)
        padded = block.new_zeros((block.shape[0], widest))
        padded[:, : block.shape[1]] = block
        parts = self.all_gather(padded)
        return torch.cat([p[:, :w] for p, w in zip(parts, widths)], 1)

    def gather_jacobian(self, compute: Callable, *, what: str, params, batch, extra: Any = ()):
        """``compute() -> (jac (n_r, P), values (n_r,), aux)`` on this rank's
        shard; returns the global ``(jac (N, P), values (N,), aux)`` (rows in
        rank order, one all-gather of N·(P+1) values; aux is this rank's). An
        empty shard does not call ``compute``."""
        like = _flat_like(params)
        size, dtype = like[0], like[1]
        n = self.local_rows(batch)
        result, counts, _ = self.agree(
            None if n == 0 else compute, what=what, params=params, count=_first_dim, extra=extra
        )
        _require_samples(counts, what)
        if result is None:
            jac, values, aux = _zeros(like, (0, size)), _zeros(like, (0,)), None
        else:
            jac, values, aux = result
        rows = torch.cat([jac.to(dtype).reshape(-1, size), values.to(dtype).reshape(-1, 1)], 1)
        rows = self.gather_rows(rows, counts)
        return rows[:, :size], rows[:, size], aux

    def gather_factors(self, compute: Callable, *, what: str, params, batch, extra: Any = ()):
        """``compute() -> (J (d_r, P), HJ (d_r, P), aux)``: the GGN factors of
        this rank's shard (d_r = outputs); returns the global pair (rows in
        rank order, each rank's HJ times its weight of kind ``"ggn"``), one
        all-gather of 2·d·P values, and this rank's aux."""
        like = _flat_like(params)
        size, dtype = like[0], like[1]
        n = self.local_rows(batch)
        if n is None and self.resolved_reduction("ggn") == "mean":
            compute = _needs_rows(what)
        result, counts, rows = self.agree(
            None if n == 0 else compute, what=what, params=params, count=_samples(n), rows=_first_dim, extra=extra
        )
        _require_samples(rows, what)
        if result is None:
            jac, hess_jac, aux = _zeros(like, (0, size)), _zeros(like, (0, size)), None
        else:
            jac, hess_jac, aux = result
        weight = self.weights(counts, "ggn")
        hess_jac = hess_jac.to(dtype) * weight if weight != 1.0 else hess_jac.to(dtype)
        both = self.gather_rows(torch.cat([jac.to(dtype), hess_jac], 1), rows)
        return both[:, :size], both[:, size:], aux

    def _reduce(self, compute, parts_of, zeros, *, what, params, count, kind, extra):
        """``(Σ_r w_r parts_r, N, local result)``: the local ``compute()`` (None:
        an empty shard, contributing ``zeros``), its ``parts_of(result)``
        weighted as ``kind`` says (None: plain sums) and summed over ranks.

        The first step of ``what`` on this group (and any step whose parts mix
        dtypes) runs the header exchange of :meth:`agree`, then one all-reduce.
        Once that passed, the status and the sample count ride in the
        payload's all-reduce instead (two more values; exact in float32 up to
        2²⁴ samples): one collective per step. Failure on any rank still makes
        every rank raise the same :class:`RankError` before anything is
        written; only the settings hash is not re-checked on those steps."""
        fused = what in self._verified and self.size > 1 and len({t.dtype for t in zeros}) == 1
        if not fused:
            result, counts, _ = self.agree(compute, what=what, params=params, count=count, extra=extra)
            _require_samples(counts, what)
            if result is None:
                parts = zeros
            else:
                weight = 1.0 if kind is None else self.weights(counts, kind)
                parts = [
                    p.to(z.dtype) * weight if weight != 1.0 else p.to(z.dtype) for p, z in zip(parts_of(result), zeros)
                ]
            return self.all_reduce_sum(parts), sum(counts), result
        result, error, n = None, None, 0
        if compute is not None:
            try:
                result = compute()
                n = int(count(result)) if callable(count) else int(count or 0)
            except Exception as err:  # shared below
                error, result = err, None
        mean = kind is not None and self.resolved_reduction(kind) == "mean"
        if result is None:
            parts = zeros
        else:
            parts = [p.to(z.dtype) * n if mean else p.to(z.dtype) for p, z in zip(parts_of(result), zeros)]
        tail = torch.tensor([float(error is not None), float(n)], dtype=zeros[0].dtype, device=zeros[0].device)
        *summed, tail = self.all_reduce_sum([*parts, tail])
        if float(tail[0]) != 0.0:
            self._raise_failures(error, what)
        total = int(round(float(tail[1])))
        _require_samples([total], what)
        if mean:
            summed = [t / total for t in summed]
        return summed, total, result

    def reduce_sums(
        self,
        compute: Callable,
        local: Callable,
        *,
        what: str,
        params,
        batch,
        shapes,
        extra: Any = (),
        count: Callable = None,
    ):
        """``compute()`` on this rank's shard, then ``local(result)`` -> tensors
        of ``shapes`` ("P" for the parameter count), summed over ranks (one
        all-reduce); returns ``(sums, N, aux)`` with aux = ``result[-1]`` of this
        rank and N the sum over ranks of ``count(result)`` (default: the
        leading dimension of ``result[0]``). An empty shard contributes zeros
        without calling ``compute``."""
        like = _flat_like(params)
        n = self.local_rows(batch)
        zeros = [_zeros(like, s) for s in shapes]
        sums, total, result = self._reduce(
            None if n == 0 else compute,
            local,
            zeros,
            what=what,
            params=params,
            count=_first_dim if count is None else _or_zero(count),
            kind=None,
            extra=extra,
        )
        return sums, total, None if result is None else result[-1]

    def reduce_term(self, compute: Callable, *, what: str, params, batch, kind: str, shape, extra: Any = ()):
        """``compute() -> (term, aux)`` on this rank's shard; returns
        ``(Σ_r w_r term_r, aux)`` with the weights of ``kind`` (one all-reduce)."""
        like = _flat_like(params)
        n = self.local_rows(batch)
        if n is None and self.resolved_reduction(kind) == "mean":
            compute = _needs_rows(what)
        (total,), _, result = self._reduce(
            None if n == 0 else compute,
            lambda r: [r[0]],
            [_zeros(like, shape)],
            what=what,
            params=params,
            count=_samples(n),
            kind=kind,
            extra=extra,
        )
        return total, None if result is None else result[1]

    def reduce_gradient(self, compute: Callable, *, what: str, params, batch, like: Any = None, extra: Any = ()):
        """``compute() -> (grads, value, aux)`` on this rank's shard (grads
        shaped like ``like``, default ``params``); returns the reduced
        ``(grads, value, aux)``: Σ_r w_r g_r and Σ_r w_r v_r with w_r = n_r/N
        (``reduction="mean"``, the default) or 1 (``"sum"``). An empty shard
        contributes nothing and does not call ``compute``."""
        like = params if like is None else like
        n = self.local_rows(batch)
        if n is None and self.resolved_reduction("scalar") == "mean":
            compute = _needs_rows(what)
        leaves, spec = tree_flatten(like)
        zeros = [torch.zeros_like(x) for x in leaves]
        zeros.append(torch.zeros((), dtype=leaves[0].dtype, device=leaves[0].device))

        def parts_of(result):
            tree, value, _ = result
            return [*tree_leaves(tree), value.detach().reshape(())]

        (*grads, value), _, result = self._reduce(
            None if n == 0 else compute,
            parts_of,
            zeros,
            what=what,
            params=params,
            count=_samples(n),
            kind="scalar",
            extra=extra,
        )
        return tree_unflatten(spec, grads), value, None if result is None else result[2]

    # ---- noise ---------------------------------------------------------------

    def noise_stream(self) -> NoiseStream:
        """The group's stream of noise seeds, made on first use: from ``seed``
        when given, else from a seed rank 0 draws from its default generator
        and broadcasts (one collective, once). Data-parallel and sharded
        groups use that seed on every rank (identical noise, so the replicas
        stay bit-identical); ``chains`` groups use seed + rank (a distinct,
        reproducible stream per rank)."""
        if self._stream is None:
            if self.seed is None:
                base = torch.tensor([draw_seed() if self.rank == 0 else 0], dtype=torch.int64)
                base = int(self.broadcast_(base, 0)[0])
            else:
                base = self.seed
            self._stream = NoiseStream(base + self.rank if self.mode == "chains" else base)
        return self._stream

    def noise(self, device: Optional[torch.device] = None):
        """Context: torch's default generators seeded from the group's noise
        stream (see :meth:`noise_stream`) for one step's draws."""
        return self.noise_stream().seeded(device)


def _flat_like(params) -> Tuple[int, torch.dtype, torch.device]:
    leaves = [x for x in tree_leaves(params) if isinstance(x, torch.Tensor)]
    return sum(x.numel() for x in leaves), leaves[0].dtype, leaves[0].device


def _zeros(like, shape) -> torch.Tensor:
    """Zeros in the parameters' dtype and device; ``"P"`` means (P,), ``"PxP"`` (P, P)."""
    shape = (like[0],) if shape == "P" else ((like[0], like[0]) if shape == "PxP" else shape)
    return torch.zeros(shape, dtype=like[1], device=like[2])


def _samples(n: Optional[int]) -> int:
    """The sample count a rank reports: its batch's, or 1 when the batch has
    no common first dimension (reduction="sum" needs none; "mean" refuses it)."""
    return 1 if n is None else n


def _or_zero(count: Callable) -> Callable:
    return lambda result: count(result) if result is not None else 0


def _first_dim(result) -> int:
    return result[0].shape[0] if result is not None else 0


def _require_samples(counts: Sequence[int], what: str) -> None:
    if sum(counts) == 0:
        raise ValueError(f"{what}: the batch is empty on every rank")


def _needs_rows(what: str) -> Callable:
    def fail():
        raise ValueError(
            f"{what}: reduction='mean' weights each rank by its number of samples, but this rank's batch has no "
            "first dimension shared by its tensor leaves: pass data_parallel(..., batch_size=fn) or reduction='sum'"
        )

    return fail


# ---- how the user names a group ----------------------------------------------


def data_parallel(group=None, *, reduction: str = "auto", batch_size: Optional[Callable] = None) -> Group:
    """Data parallelism over ``group``: each rank passes its own shard of one
    global batch; every rank gets the state one process would get for the
    concatenation of the shards in rank order (up to float reduction order),
    bit-identical across ranks.

    Args:
        group: A ``torch.distributed.ProcessGroup``; None for the default (world) group.
        reduction: How the values of a function that returns one number for
            its whole batch combine across ranks: ``"mean"`` weights rank r by
            its number of samples n_r (Σ n_r f_r / Σ n_r: exact for a per-datum
            mean such as posteriors' mean log-likelihood + log prior / N);
            ``"sum"`` adds them (exact for a sum over the data; a term that does
            not grow with the data, such as a log prior, must then be on one
            rank only, or divided by R). ``"auto"``: ``"mean"`` for log
            posteriors and losses (SG-MCMC, VI, optim, torchopt,
            ``laplace.dense_hessian``, ``hessian_operator``), ``"sum"`` for outer
            log-likelihoods and losses of the model outputs (the GGN methods,
            ``ggn``, ``diag_ggn``, ``ggn_operator``). Methods built from
            per-sample terms (EKF, Fisher Laplace, ``empirical_fisher``) are
            exact either way.
        batch_size: ``batch_size(batch) -> n_r`` when the batch's tensor leaves
            do not share their first dimension.

    Returns:
        A :class:`Group` to pass as ``process_group=``.
    """
    return Group(group, "data", reduction, None, batch_size)


def sharded(group=None, *, reduction: str = "auto", batch_size: Optional[Callable] = None) -> Group:
    """Data parallelism (as :func:`data_parallel`) with the P×P matrix of
    ``ekf.dense_fisher`` or ``laplace.dense_*`` split by rows across the ranks:
    rank r holds rows [r·P/R, (r+1)·P/R) as a :class:`ShardedMatrix`.

    Returns:
        A :class:`Group` to pass as ``process_group=``.
    """
    return Group(group, "sharded", reduction, None, batch_size)


def chains(group=None, *, seed: Optional[int] = None) -> Group:
    """Independent chains: one SG-MCMC chain (or VI fit, or optimisation) per
    rank, on that rank's own data, with nothing reduced. Rank r draws its noise
    from the stream of seed + r; with ``seed=None`` rank 0 draws the seed from
    its default generator and broadcasts it once (so ``torch.manual_seed``
    on rank 0 reproduces every chain).

    Returns:
        A :class:`Group` to pass as ``process_group=``.
    """
    return Group(group, "chains", "auto", seed, None)


_FROM_PROCESS_GROUP: dict = {}


def resolve(process_group, what: str, modes: Sequence[str] = ("data",)) -> Optional[Group]:
    """The :class:`Group` a method runs with: None for None (one process:
    nothing changes), the group itself, or ``data_parallel(pg)`` for a
    ``torch.distributed.ProcessGroup`` (one per process group, reused).

    Raises:
        TypeError: anything else.
        ValueError: a mode ``what`` does not support.
    """
    if process_group is None:
        return None
    if isinstance(process_group, Group):
        group = process_group
    elif dist.is_available() and isinstance(process_group, dist.ProcessGroup):
        group = _FROM_PROCESS_GROUP.get(id(process_group))
        if group is None or group.pg is not process_group:
            group = _FROM_PROCESS_GROUP[id(process_group)] = data_parallel(process_group)
    else:
        raise TypeError(
            "process_group must be None, a torch.distributed.ProcessGroup, or one of "
            "posteriors_fast.distributed.data_parallel(...), sharded(...), chains(...); "
            f"got {type(process_group).__name__}"
        )
    if group.mode not in modes:
        raise ValueError(f"{what} does not run in {group.mode!r} mode; it supports {', '.join(map(repr, modes))}")
    return group


def broadcast_(tree, group=None, src: int = 0):
    """Copy group rank ``src``'s values into every rank's tensors of ``tree``
    in place (one broadcast per leaf), e.g. to start every rank from rank 0's
    initial parameters. ``group``: a Group, a ProcessGroup or None (world).
    Returns ``tree``."""
    g = group if isinstance(group, Group) else data_parallel(group)
    with torch.no_grad():
        for leaf in tree_leaves(tree):
            g.broadcast_(leaf, src)
    return tree


def all_gather_tree(tree, group=None):
    """Every rank's ``tree`` (same structure and shapes on every rank),
    stacked: each leaf gets a leading dimension of size R, in rank order (e.g.
    the positions of independent chains, one per rank)."""
    g = group if isinstance(group, Group) else data_parallel(group)
    leaves, spec = tree_flatten(tree)
    return tree_unflatten(spec, [torch.stack(g.all_gather(x.detach())) for x in leaves])
