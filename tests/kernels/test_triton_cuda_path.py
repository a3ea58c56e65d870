"""What the CUDA path of the Triton kernels relies on, checked on a machine
without a GPU: 64-bit offsets (run under the interpreter at offsets past
2^31), the device guard around every launch, IEEE float32 dots, and that every
launch compiles for CUDA targets.

The kernels are interpreted (``conftest.py``). The interpreter evaluates a
kernel's integer arithmetic in numpy with Triton's types: ``tl.program_id``,
``tl.arange`` and integer arguments below 2^31 are int32, and int32 products
wrap exactly as they do on a GPU, so a 32-bit offset computation gives the
same wrong address here as there.
"""

import ast
import importlib.util
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tests.conftest import skip_unless_installed

skip_unless_installed(importlib.util.find_spec("triton") is not None, "triton not installed")

from posteriors_fast.kernels.triton import _launch, cg_step, syrk  # noqa: E402

from .conftest import KERNEL_MODULES  # noqa: E402

syrk_op = torch.ops.posteriors_fast.syrk_triton

# ---------------------------------------------------------------- offsets past 2^31

#: Element index where the large-offset views start. Every offset the tests
#: use lies in [0, 2^32), so an offset computed in int32 (wrapped into
#: [-2^31, 2^31)) still lands inside the file: a 32-bit kernel gives wrong
#: numbers, not a segmentation fault.
VIEW_BASE = 2**31


@pytest.fixture
def sparse_f32(tmp_path):
    """A float32 tensor of 3·2^31 elements (24 GiB of address space) mapped
    from a sparse file: only the pages a test touches take memory or disk."""
    if sys.maxsize < 2**62:
        pytest.skip("needs a 64-bit address space")
    numel = 3 * 2**31
    path = tmp_path / "sparse.f32"
    with open(path, "wb") as f:
        f.truncate(numel * 4)
    try:
        big = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32)
    except (RuntimeError, OSError) as e:  # pragma: no cover - platform dependent
        pytest.skip(f"cannot map a 24 GiB sparse file: {e}")
    yield big
    del big
    path.unlink()


def test_syrk_offsets_past_2_31(sparse_f32):
    """The real syrk kernel on views whose row stride S puts rows 32.. past
    element 2^31 (rows 0..31 stay below): ``rm·stride_om`` (out, also its
    mirrored store), ``rm·stride_cm`` (c), ``k·stride_ak`` in the third K step
    (a, row-major) and ``n·stride_bp`` (b, column-major) all pass 2^31.

    With 32-bit offsets those products wrap to ``offset - 2^32``: the second
    row tile and the third K step read and write 8 GiB before the views
    (zeros of the sparse file), and the result is off by O(1).
    """
    size, depth = 40, 40  # two row/column tiles and three K steps of 16
    stride = 2**26 + 3  # 32·stride > 2^31 > 31·stride
    big = sparse_f32
    # The views interleave within the same rows (columns 0.., 64.., 128..,
    # 192..), so each row touches one or two pages.
    out = big.as_strided((size, size), (stride, 1), VIEW_BASE)
    c = big.as_strided((size, size), (stride, 1), VIEW_BASE + 64)
    a = big.as_strided((depth, size), (stride, 1), VIEW_BASE + 128)
    b = big.as_strided((depth, size), (1, stride), VIEW_BASE + 192)
    assert max((n - 1) * s for t in (out, c, a, b) for n, s in zip(t.shape, t.stride())) > 2**31

    gen = torch.Generator().manual_seed(0)
    a64 = torch.randn(depth, size, dtype=torch.float64, generator=gen)
    h = torch.randn(depth, depth, dtype=torch.float64, generator=gen)
    m = torch.randn(size, size, dtype=torch.float64, generator=gen)
    a.copy_(a64)
    b.copy_((h + h.T) @ a64)  # aᵀb = aᵀ(H + Hᵀ)a is symmetric
    c.copy_(m + m.T)
    out.fill_(123.0)

    syrk_op(out, a, b, c, -1.0, 0.5, True)
    expected = 0.5 * c.double() - a.double().T @ b.double()
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4 * scale)
    assert torch.equal(out, out.T)


#: Programs before the two that run: their blocks start at 2^21·1024 = 2^31.
PID_SHIFT = 2**21


def _shift_program_ids(monkeypatch, shift):
    """Make the interpreter report program ids (and the program count) of
    axis 0 ``shift`` higher, as if the grid had ``shift`` more programs in
    front of the ones that run: a grid of 2 then runs the programs a GPU would
    run last on a vector of ``shift·BLOCK + 2·BLOCK`` elements. The values
    stay int32, as ``tl.program_id`` is on a GPU."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    for name in ("create_get_program_id", "create_get_num_programs"):
        real = getattr(builder, name)

        def shifted(axis, real=real):
            handle = real(axis)
            if axis != 0:
                return handle
            return interpreter.TensorHandle((handle.data + shift).astype(np.int32), handle.dtype.scalar)

        monkeypatch.setattr(builder, name, shifted)


def test_cg_kernels_offsets_past_2_31(sparse_f32, monkeypatch):
    """The three CG kernels on the last two blocks of vectors of 2^31 + 2043
    elements (the last block partial): the block start ``pid·BLOCK`` passes
    2^31.

    With 32-bit offsets ``pid·BLOCK`` wraps to ``start - 2^32``: the kernels
    read zeros 8 GiB before the vectors and write there, so x, r, p keep their
    values and the partial sums are 0.
    """
    block = cg_step.BLOCK
    lo = PID_SHIFT * block
    n = lo + 2 * block - 5
    assert lo >= 2**31
    big = sparse_f32
    # Contiguous vectors over the file; their touched windows [lo, n) are
    # 4096 elements apart. Bases past 2^31 keep wrapped offsets in the file.
    base = VIEW_BASE + 2**30
    x, r, p, ap = (big.as_strided((n,), (1,), base + i * 4096) for i in range(4))
    gen = torch.Generator().manual_seed(1)
    win = {name: torch.randn(n - lo, dtype=torch.float64, generator=gen) for name in ("x", "r", "p", "ap")}
    for name, t in zip(("x", "r", "p", "ap"), (x, r, p, ap)):
        t[lo:].copy_(win[name])
    alpha, damping, ratio = 0.5, 0.3, 0.25
    nblocks = PID_SHIFT + 2  # what tl.num_programs(0) reports
    part = torch.zeros(2, nblocks)
    part_rr = torch.zeros(nblocks)
    scal = torch.tensor([alpha, alpha * damping])

    _shift_program_ids(monkeypatch, PID_SHIFT)
    _launch.launch(cg_step._cg_dots_kernel, (2,), p, ap, part, n, HAS_DAMPING=True, BLOCK=block)
    _launch.launch(cg_step._cg_update_kernel, (2,), x, r, p, ap, scal, part_rr, n, HAS_DAMPING=True, BLOCK=block)
    _launch.launch(cg_step._cg_direction_kernel, (2,), p, r, torch.tensor([ratio]), n, BLOCK=block)
    monkeypatch.undo()

    def blocks(v):
        return torch.stack([v[:block].sum(), v[block:].sum()])

    p0, ap0 = win["p"], win["ap"]
    x1 = win["x"] + alpha * p0
    r1 = win["r"] - alpha * ap0 - alpha * damping * p0
    p1 = r1 + ratio * p0

    def close(actual, expected):
        torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-4)

    close(part[0, PID_SHIFT:], blocks(p0 * ap0))
    close(part[1, PID_SHIFT:], blocks(p0 * p0))
    close(x[lo:], x1)
    close(r[lo:], r1)
    close(part_rr[PID_SHIFT:], blocks(r1 * r1))
    close(p[lo:], p1)
    assert (part[:, :PID_SHIFT] == 0).all() and (part_rr[:PID_SHIFT] == 0).all()


# ---------------------------------------------------------------- device guard


class _ClaimsCuda1(torch.Tensor):
    """A CPU tensor that reports ``cuda:1`` as its device: what the launch
    path sees of a tensor on a second GPU, with data the interpreter can run
    on. (No torch function handling: only ``.device`` differs.)"""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self):
        return torch.device("cuda", 1)


def _on_cuda1(t):
    return torch.Tensor._make_subclass(_ClaimsCuda1, t)


def _spy_launches(monkeypatch, record):
    """Replace ``torch.library.wrap_triton`` (through which ``_launch.launch``
    runs every kernel) so that each launch first calls
    ``record(kernel, args, kwargs)``."""
    real_wrap_triton = torch.library.wrap_triton

    def spy_wrap_triton(kernel):
        wrapped = real_wrap_triton(kernel)

        class Launcher:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    record(kernel, args, kwargs)
                    return wrapped[grid](*args, **kwargs)

                return run

        return Launcher()

    monkeypatch.setattr(torch.library, "wrap_triton", spy_wrap_triton)


@pytest.fixture
def guard_log(monkeypatch):
    """``torch.cuda.device`` replaced by a recorder, and ``wrap_triton`` by a
    spy noting, for each launch, the kernel and the device of the innermost
    guard around it (``None`` outside any)."""
    log = {"entered": [], "launches": []}
    active = []

    class RecordingDevice:
        def __init__(self, device):
            self.device = torch.device(device)
            log["entered"].append(self.device)

        def __enter__(self):
            active.append(self.device)

        def __exit__(self, *exc):
            active.pop()
            return False

    def record(kernel, args, kwargs):
        log["launches"].append((kernel, active[-1] if active else None))

    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    _spy_launches(monkeypatch, record)
    return log


def test_device_guard(guard_log):
    cuda1 = torch.device("cuda", 1)
    guard = _launch.device_guard(cuda1)
    assert guard_log["entered"] == [cuda1] and guard.device == cuda1
    for device in (torch.device("cpu"), None):
        with _launch.device_guard(device):
            pass
    assert guard_log["entered"] == [cuda1]


def test_launches_run_inside_the_guard_of_their_tensors_device(guard_log):
    cuda1 = torch.device("cuda", 1)
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(6, 40, generator=gen)
    m = torch.randn(40, 40, generator=gen)
    c = m + m.T
    out = torch.empty(40, 40)
    syrk_op(_on_cuda1(out), _on_cuda1(a), None, _on_cuda1(c), 1.0, 1.0, True)
    torch.testing.assert_close(out, c + a.T @ a, rtol=1e-5, atol=1e-4)
    cov = c.clone()
    torch.ops.posteriors_fast.cov_downdate_triton(_on_cuda1(cov), _on_cuda1(a))
    torch.testing.assert_close(cov, c - a.T @ a, rtol=1e-5, atol=1e-4)
    # The CG op allocates its scratch on x.device, which a CPU-only torch
    # cannot do for cuda:1: its kernels are launched here as the op does.
    p, r = torch.randn(3000, generator=gen), torch.randn(3000, generator=gen)
    expected = r + 0.5 * p
    args = (_on_cuda1(p), _on_cuda1(r), _on_cuda1(torch.tensor([0.5])), 3000)
    _launch.launch(cg_step._cg_direction_kernel, (3,), *args, BLOCK=cg_step.BLOCK)
    torch.testing.assert_close(p, expected)
    assert guard_log["launches"] == [
        (syrk._syrk_kernel, cuda1),
        (syrk._syrk_kernel, cuda1),
        (cg_step._cg_direction_kernel, cuda1),
    ]


def test_cpu_launches_enter_no_cuda_guard_and_all_go_through_launch(guard_log):
    size = 2500
    x, r, p = (torch.randn(size) for _ in range(3))
    torch.ops.posteriors_fast.cg_step_triton(x, r, p, 2 * p, r @ r, 0.1)
    kernels = [kernel for kernel, _ in guard_log["launches"]]
    assert kernels == [cg_step._cg_dots_kernel, cg_step._cg_update_kernel, cg_step._cg_direction_kernel]
    assert guard_log["entered"] == [] and all(device is None for _, device in guard_log["launches"])


def test_launch_rejects_tensors_on_several_devices(guard_log):
    p, r, ratio = torch.zeros(8), torch.zeros(8), torch.ones(1)
    for other in (_on_cuda1(r), r.to("meta")):
        with pytest.raises(ValueError, match="one device"):
            _launch.launch(cg_step._cg_direction_kernel, (1,), p, other, ratio, 8, BLOCK=cg_step.BLOCK)
    assert guard_log["launches"] == []
    # The ops name the argument first.
    a = torch.randn(3, 8)
    with pytest.raises(ValueError, match="^out must be on device cpu"):
        syrk_op(_on_cuda1(torch.zeros(8, 8)), a, None, None, 1.0, 0.0, True)
    with pytest.raises(ValueError, match="^cov must be on device cpu"):
        torch.ops.posteriors_fast.cov_downdate_triton(_on_cuda1(torch.eye(8)), a)
    with pytest.raises(ValueError, match="^r must be on device cpu"):
        torch.ops.posteriors_fast.cg_step_triton(p, _on_cuda1(r), p.clone(), p.clone(), torch.tensor(1.0), 0.0)


# ---------------------------------------------------------------- float32 dot precision


def _kernel_functions():
    """Every ``triton.jit`` function defined in the kernel modules, by name."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    found = {}
    for name in KERNEL_MODULES:
        module = sys.modules[name]
        for attr, value in vars(module).items():
            if isinstance(value, (InterpretedFunction, JITFunction)) and value.fn.__module__ == name:
                found[f"{name}.{attr}"] = value
    return found


def test_conftest_imports_every_kernel_module():
    import posteriors_fast.kernels.triton as package

    names = {f"{package.__name__}.{info.name}" for info in pkgutil.iter_modules(package.__path__)}
    assert names == set(KERNEL_MODULES)


def test_every_tl_dot_keeps_ieee_input_precision():
    """A float32 ``tl.dot`` without ``input_precision="ieee"`` runs in TF32 on
    GPUs with tensor cores (Triton's default), about 1e-3 relative error,
    where the interpreter computes it in full float32: no CPU test would see
    it. So the source of every kernel is checked instead."""
    dots = []
    for name, function in _kernel_functions().items():
        tree = ast.parse(textwrap.dedent(inspect.getsource(function.fn)))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            callee = node.func
            callee_name = callee.attr if isinstance(callee, ast.Attribute) else getattr(callee, "id", None)
            if callee_name != "dot":
                continue
            line = function.fn.__code__.co_firstlineno + node.lineno - 1
            where = f"{name} (line {line}): {ast.unparse(node)}"
            precision = {kw.arg: kw.value for kw in node.keywords}.get("input_precision")
            assert isinstance(precision, ast.Constant) and precision.value == "ieee", (
                f'{where} must pass input_precision="ieee" (by keyword)'
            )
            assert len(node.args) <= 3, f"{where}: input_precision given positionally too"
            dots.append(where)
    assert any(w.startswith("posteriors_fast.kernels.triton.syrk._syrk_kernel ") for w in dots), dots


# ---------------------------------------------------------------- compiling for CUDA

#: Run in a fresh interpreter: this process's kernels, and triton's own device
#: functions (tl.sum), are interpreted and cannot be compiled. Reads the cases
#: as JSON on stdin; prints one JSON result.
_COMPILE_SCRIPT = r"""
import importlib, json, re, sys
import torch.library
import triton
from triton.backends import backends

# Only compiling here: skip registering the custom ops, whose triton_op
# imports torch._inductor (seconds).
torch.library.triton_op = lambda name, mutates_args=None, **kwargs: (lambda fn: fn)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if "nvidia" not in backends:
    print(json.dumps({"skip": "triton has no nvidia backend"}))
    sys.exit()
results = []
for case in json.load(sys.stdin):
    kernel = getattr(importlib.import_module(case["module"]), case["kernel"])
    for arch in case["archs"]:
        result = {"case": case, "arch": arch, "error": None, "dots": []}
        try:
            compiled = triton.compile(
                ASTSource(kernel, case["signature"], constexprs=case["constexprs"]),
                target=GPUTarget("cuda", arch, 32),
            )
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"
        else:
            for line in compiled.asm["ttir"].splitlines():
                if " tt.dot " in line:
                    # IEEE is the default of the attribute, not printed.
                    found = re.search(r"inputPrecision = (\w+)", line)
                    result["dots"].append(found.group(1) if found else "ieee")
            result["cubin"] = len(compiled.asm["cubin"])
        results.append(result)
print(json.dumps({"results": results}))
"""


def _cuda_specialisation(kernel, args, kwargs):
    """``(signature, constexprs)`` for ``triton.compile`` as the JIT would
    build them for a launch with these arguments: tensors as pointers,
    ``tl.constexpr`` parameters and integers equal to 1 as constants (the JIT
    specialises those), annotated scalars (``"fp64"``) as annotated. Alignment
    hints are left out (they select faster code, not other semantics)."""
    import triton.language as tl
    from triton.runtime.jit import mangle_type

    parameters = inspect.signature(kernel.fn).parameters
    bound = inspect.signature(kernel.fn).bind(*args, **kwargs).arguments
    signature, constexprs = {}, {}
    for name, parameter in parameters.items():
        value = bound[name]
        annotation = parameter.annotation
        if annotation is tl.constexpr or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(annotation, str):
            signature[name] = annotation
        else:
            signature[name] = mangle_type(value)
    return signature, constexprs


def test_kernels_compile_for_cuda(monkeypatch, tmp_path):
    """Every launch the ops make for a spread of arguments, compiled for sm_80
    (float32 syrk also for sm_90) to TTIR, PTX and a cubin with triton's
    bundled ptxas, no GPU needed; the float32 syrk dot is IEEE in the IR. Catches
    what the interpreter does not compile: e.g. ``stride.to(tl.int64)`` on a
    stride of 1, which the JIT turns into a constexpr int."""
    launches = []
    _spy_launches(monkeypatch, lambda kernel, args, kwargs: launches.append((kernel, args, kwargs)))
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.float64):
        a = torch.randn(7, 70, dtype=dtype, generator=gen)
        m = torch.randn(70, 70, dtype=dtype, generator=gen)
        c = m + m.T
        syrk_op(torch.empty(70, 70, dtype=dtype), a, None, None, 1.0, 0.0, True)
        # Column-major a and b (stride 1 along K), a separate c, no mirror.
        at = a.T.contiguous().T
        syrk_op(torch.empty(70, 70, dtype=dtype), at, at, c, -1.0, 0.5, False)
        torch.ops.posteriors_fast.cov_downdate_triton(c.clone(), a / 10)
        for size in (1, 3000):
            x, r, p = (torch.randn(size, dtype=dtype, generator=gen) for _ in range(3))
            for damping in (0.0, 0.3):
                torch.ops.posteriors_fast.cg_step_triton(x, r, p, 2 * p, r @ r, damping)
    monkeypatch.undo()

    cases = {}
    for kernel, args, kwargs in launches:
        signature, constexprs = _cuda_specialisation(kernel, args, kwargs)
        module, name = kernel.fn.__module__, kernel.fn.__name__
        # Hopper is where a float32 dot would lower differently (wgmma).
        archs = [80, 90] if name == "_syrk_kernel" and signature["a_ptr"] == "*fp32" else [80]
        case = {"module": module, "kernel": name, "signature": signature, "constexprs": constexprs, "archs": archs}
        cases[json.dumps(case, sort_keys=True)] = case
    assert {case["kernel"] for case in cases.values()} == {
        "_syrk_kernel",
        "_cg_dots_kernel",
        "_cg_update_kernel",
        "_cg_direction_kernel",
    }

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(syrk.__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT],
        input=json.dumps(list(cases.values())),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip(report["skip"])
    failures = [
        f"{r['case']['kernel']} sm_{r['arch']} {r['case']['signature']}: {r['error']}"
        for r in report["results"]
        if r["error"]
    ]
    assert not failures, "\n".join(failures)
    for result in report["results"]:
        if result["case"]["kernel"] == "_syrk_kernel":
            assert result["dots"], result
            if result["case"]["signature"]["a_ptr"] == "*fp32":
                assert set(result["dots"]) == {"ieee"}, result
