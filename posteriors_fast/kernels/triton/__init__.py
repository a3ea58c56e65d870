"""Triton kernels (``syrk``, ``cov_downdate``, ``cg_step``) registered as
``torch.library.triton_op`` custom ops. Import a submodule only when triton is
wanted: this package itself imports neither triton nor its submodules."""
