"""What inductor's on-disk caches (``TORCHINDUCTOR_CACHE_DIR``) hold for the
compile policy's estimates: how much of a compile was inductor generating code
(the part those caches keep, so that a later process loads the graph instead),
where the caches are, and whether a compile now would find them there.

Torch's internals are read defensively: anything unexpected makes the split
unknown (None), and the policy then estimates as if nothing were cached.
"""

import functools
import os
import sys
from typing import Optional, Tuple

#: What dynamo times inductor's code generation and build under (the part of
#: a compile that inductor's on-disk caches keep; it also times a load from them).
GENERATE_METRIC = "fx_codegen_and_compile"

State = Tuple[int, float, int, int]


def codegen_state() -> Optional[State]:
    """(timed code generations, their seconds, FX-graph cache misses and
    bypasses, FX-graph cache hits) so far in this process, from dynamo's
    records (None if torch keeps none of them)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics, counters

        times = compilation_time_metrics.get(GENERATE_METRIC, [])
        inductor = counters["inductor"]
        misses = int(inductor["fxgraph_cache_miss"] + inductor["fxgraph_cache_bypass"])
        return len(times), float(sum(times)), misses, int(inductor["fxgraph_cache_hit"])
    except Exception:  # torch internals moved: the split is unknown
        return None


def generated_since(before: Optional[State]) -> Optional[float]:
    """Seconds inductor spent generating code since ``before``: 0 when the
    graphs since all came from its FX-graph cache (hits, no miss or bypass);
    None when that is not known (no record, nothing went through the cache,
    or the records were reset)."""
    if before is None:
        return None
    after = codegen_state()
    if after is None:
        return None
    (n0, s0, miss0, hit0), (n1, s1, miss1, hit1) = before, after
    if n1 < n0 or miss1 < miss0 or hit1 < hit0:  # reset meanwhile
        return None
    if miss1 == miss0:
        return 0.0 if hit1 > hit0 else None
    return s1 - s0 if s1 >= s0 else None


def location() -> Optional[Tuple[str, int]]:
    """(directory, inode) of inductor's on-disk caches, None when they are off
    (called after a compile: inductor is imported)."""
    try:
        from torch._inductor import config
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        if not config.fx_graph_cache or config.force_disable_caches:
            return None
        directory = cache_dir()
        return directory, os.stat(directory).st_ino
    except Exception:  # torch internals moved: no cached estimate
        return None


@functools.lru_cache(maxsize=1)
def default_dir() -> str:
    """Where inductor keeps its caches when ``TORCHINDUCTOR_CACHE_DIR`` is
    unset (its rule, without importing it: the system temp directory)."""
    import getpass
    import re
    import tempfile

    try:
        user = getpass.getuser()
    except (KeyError, ImportError, OSError):
        user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
    return os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))


def caches_on() -> bool:
    """Whether inductor's local FX-graph cache is on, without importing
    inductor: its config when imported, else the environment it reads."""
    if getattr(sys.modules.get("torch.compiler.config"), "force_disable_caches", False):
        return False
    config = sys.modules.get("torch._inductor.config")
    if config is not None:
        return bool(getattr(config, "fx_graph_cache", True)) and not getattr(config, "force_disable_caches", False)
    forced = os.environ.get("TORCHINDUCTOR_FX_GRAPH_CACHE")
    if forced is not None:
        return forced != "0"
    return os.environ.get("TORCHINDUCTOR_FX_GRAPH_CACHE_DEFAULT") != "0"


def holds(directory: str, inode: int) -> bool:
    """Whether a compile now would find what inductor cached in
    ``directory``: its caches are on, that is the directory it uses, and it
    is the same directory (same inode: not removed and made again since)."""
    if not caches_on():
        return False
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    in_use = os.path.abspath(current) if current else default_dir()
    if in_use != directory:
        return False
    try:
        return os.stat(directory).st_ino == inode
    except OSError:
        return False
