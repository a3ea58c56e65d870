"""Inductor's probes of the CPU's vector instruction sets, remembered between
processes.

The first CPU graph a process compiles makes inductor check the vector ISAs
the CPU reports (AVX2, AVX-512 and its VNNI and BF16 extensions, ...): for
each it builds a small library with that ISA's flags, then loads the library
in a child Python process to see that it runs. The builds stay in inductor's
on-disk cache; the child processes do not, and cost about a second on 2
cores in every new process. Whether a library loads depends on the machine,
the compiler, Python and torch, not on the process, so the compile policy
keeps the libraries that loaded (``inductor_isa.json`` in its cache
directory, per machine key) and, during its own compiles, answers inductor's
load check for those from the file instead of starting a child. A library
that failed to load is not remembered (it is checked again next time), a
new machine key starts empty, and anything unexpected in torch's internals
leaves inductor checking as usual.
"""

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from typing import Callable, Iterator, Optional

import torch

from posteriors_fast._internal.json_file import read_json, write_json

logger = logging.getLogger("posteriors_fast")

FILE_NAME = "inductor_isa.json"

_lock = threading.Lock()
_active = {"depth": 0, "original": None}


def _machine_key() -> str:
    """What a load check's answer depends on: torch, Python, the CPU's vector
    flags and the compiler inductor would call (its path and modification
    time). Raises on a torch without the internals this relies on."""
    from torch._inductor import config
    from torch._inductor.cpu_vec_isa import x86_isa_checker

    compilers = []
    cxx = config.cpp.cxx
    for name in cxx if isinstance(cxx, (list, tuple)) else (cxx,):
        path = shutil.which(name) if isinstance(name, str) else None
        if path:
            real = os.path.realpath(path)
            compilers.append(f"{real}@{os.stat(real).st_mtime_ns}")
    parts = [torch.__version__, sys.executable, platform.machine(), ",".join(x86_isa_checker()), ";".join(compilers)]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()


@contextlib.contextmanager
def remembered_probe(directory: Callable[[], Optional[str]]) -> Iterator[None]:
    """Context for one compile: inductor's load checks of its ISA libraries
    answered from the cache directory ``directory()`` where an earlier process
    on this machine saw them load, and the new ones that load remembered
    there. None (no cache directory) changes nothing."""
    root = directory()
    try:
        from torch._inductor.cpu_vec_isa import VecISA

        original = VecISA.__dict__["_probe_load"]
        key = _machine_key() if root is not None else None
    except Exception as err:  # a torch whose internals differ: check as usual
        logger.debug("posteriors_fast: inductor ISA checks not remembered (%s)", err)
        root = None
    if root is None:
        yield
        return
    path = os.path.join(root, FILE_NAME)
    entry = read_json(path).get(key)
    known = set(entry) if isinstance(entry, list) else set()
    learnt = set()

    def probe_load(isa, output_path: str) -> bool:
        name = os.path.basename(output_path)
        if name in known:
            return True
        loaded = original(isa, output_path)
        if loaded:
            learnt.add(name)
        return loaded

    with _lock:  # nested or concurrent compiles: the outermost installs and restores
        if _active["depth"] == 0:
            _active["original"] = original
            VecISA._probe_load = probe_load
        _active["depth"] += 1
    try:
        yield
    finally:
        with _lock:
            _active["depth"] -= 1
            if _active["depth"] == 0:
                VecISA._probe_load = _active["original"]
        if learnt:
            data = read_json(path)
            before = data.get(key)
            data[key] = sorted((set(before) if isinstance(before, list) else set()) | known | learnt)
            write_json(path, data)
