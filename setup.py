"""Build script. Metadata lives in pyproject.toml; this file only adds the
optional C++ CPU kernels in ``csrc/cpu`` as the extension ``posteriors_fast._C``.

The extension is built with ``torch.utils.cpp_extension`` (ninja when present)
against the torch that is already installed, so install with
``pip install --no-build-isolation -e .``: an isolated build environment would
have to download its own torch, and an unpinned torch is a multi-GB CUDA build.

Never fatal: without torch at build time, with ``POSTERIORS_FAST_BUILD_EXT=0``,
or when the compiler fails, the package installs as pure Python, the reason is
printed, and ``backend="compiled"`` falls back (``posteriors_fast.backends.explain()``
says so at run time).
"""

import ctypes.util
import glob
import os
import sys

from setuptools import setup


def _say(msg: str) -> None:
    print(f"posteriors_fast setup: {msg}", file=sys.stderr)


def _extension_kwargs() -> dict:
    if os.environ.get("POSTERIORS_FAST_BUILD_EXT", "1") == "0":
        _say("POSTERIORS_FAST_BUILD_EXT=0: skipping the C++ extension")
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # no torch in this build environment
        _say(
            f"torch not importable at build time ({exc}); skipping the C++ extension "
            "(use pip install --no-build-isolation)"
        )
        return {}

    class SoftBuildExtension(BuildExtension):
        """Log a failed compile and install without the extension."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                _say(f"building the C++ extension failed, installing without it: {exc}")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                _say(f"building {ext.name} failed, installing without it: {exc}")

    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # glibc's vector math library (vectorised log/sin for the normal draws).
    have_mvec = sys.platform.startswith("linux") and ctypes.util.find_library("mvec") is not None
    mvec_flags, mvec_libs = (["-DPF_HAVE_LIBMVEC"], ["-lmvec"]) if have_mvec else ([], [])
    ext = CppExtension(
        "posteriors_fast._C",
        sources,
        depends=sorted(glob.glob(os.path.join("csrc", "cpu", "*.h"))),
        # -fopenmp: ATen's at::parallel_for / parallel_reduce are header
        # templates around `#pragma omp parallel`; without the flag they
        # silently run on one thread (the CG step at P = 10⁷ of
        # benchmarks/bench_cg_step.py then takes as long with --threads 2 as
        # with --threads 1). libgomp is torch's own.
        # -fno-math-errno lets log/sin calls vectorise (normal.cpp); it does
        # not change results, unlike -ffast-math, which is never used.
        extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno"] + mvec_flags,
        extra_link_args=["-fopenmp"] + mvec_libs,
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": SoftBuildExtension.with_options(use_ninja=True)}}


setup(**_extension_kwargs())
