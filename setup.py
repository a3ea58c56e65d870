"""Build script. Metadata lives in pyproject.toml.

The native CPU kernels (``csrc/cpu``) are not part of this release yet; when they
are, this file builds them with ``torch.utils.cpp_extension`` and
``POSTERIORS_FAST_BUILD_EXT=0`` skips them. Until then it is a pure-Python
package and installs without a compiler.
"""

from setuptools import setup

setup()
