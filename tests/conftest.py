"""Shared fixtures. posteriors 0.0.5 imports ``optree.integration.torch``, which
current optree calls ``optree.integrations.torch``: alias it before anything
imports the reference."""

import sys

import optree
import optree.integrations
import optree.integrations.torch
import pytest
import torch

sys.modules.setdefault("optree.integration", optree.integrations)
sys.modules.setdefault("optree.integration.torch", optree.integrations.torch)


@pytest.fixture
def ref():
    """The reference implementation, posteriors 0.0.5."""
    try:
        import posteriors
    except ImportError:
        pytest.skip("posteriors==0.0.5 not installed (pip install -e .[test])")
    return posteriors


@pytest.fixture(params=["eager", "compiled"])
def backend(request):
    return request.param


@pytest.fixture(params=[torch.float32, torch.float64], ids=["f32", "f64"])
def dtype(request):
    return request.param
