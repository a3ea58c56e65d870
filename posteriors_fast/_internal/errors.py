"""Errors and the aux-output guard shared by every layer."""

import contextlib

# Fragments of the messages torch.func raises when has_aux=True is given a
# function without a well-formed aux output (posteriors 0.0.5's names).
NO_AUX_ERROR_MSG = "should be a tuple: (output, aux) if has_aux is True"
NON_TENSOR_AUX_ERROR_MSG = "Expected tensors, got unsupported type"

MISSING_AUX_MESSAGE = (
    "Auxiliary output not found: the function must return a pair (value, aux). "
    "With nothing to pass on, return e.g. (value, torch.tensor([]))."
)
BAD_AUX_MESSAGE = (
    "Auxiliary output should be a TensorTree (a pytree of tensors). With nothing "
    "to pass on, return e.g. (value, torch.tensor([]))."
)


class CatchAuxError(contextlib.AbstractContextManager):
    """Context manager turning torch.func's terse errors about a missing or
    non-tensor auxiliary output into a RuntimeError that says what to return."""

    def __exit__(self, exc_type, exc_value, traceback):
        if exc_type is None:
            return False
        text = str(exc_value)
        if NO_AUX_ERROR_MSG in text:
            raise RuntimeError(MISSING_AUX_MESSAGE) from exc_value
        if NON_TENSOR_AUX_ERROR_MSG in text:
            raise RuntimeError(BAD_AUX_MESSAGE) from exc_value
        return False


def split_aux(out, has_aux: bool):
    """``(value, aux)`` from a function output; ``aux`` is None without has_aux."""
    if not has_aux:
        return out, None
    if not isinstance(out, tuple) or len(out) != 2:
        raise RuntimeError(MISSING_AUX_MESSAGE)
    return out
