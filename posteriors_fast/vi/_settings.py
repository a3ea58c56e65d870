"""What the variational methods share: the validation of their settings (the
optimizer step itself is :mod:`posteriors_fast._internal.torchopt_step`)."""

import math

from posteriors_fast._internal import checks as _checks


def check_settings(temperature, n_samples) -> None:
    """``temperature`` finite and >= 0; ``n_samples`` a positive integer."""
    t = _checks.scalar_value(temperature, "temperature")
    if not (t >= 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be finite and >= 0, got {t}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
