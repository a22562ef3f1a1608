"""Argument checks shared by every module.

Each raises a `ValueError` (or `TypeError`) that names the argument, the
value it got and what it accepts, before any tensor work starts.
"""

import math
import numbers

REDUCTIONS = ("mean", "sum", "none")


def check_positive_number(name, value):
    """Raises unless `value` is a finite Python number greater than 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{name}` must be a Python number greater than 0, "
            f"got {value!r} of type {type(value).__name__}."
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"`{name}` must be a finite number greater than 0 (e.g. 1.0 to "
            f"10.0), got {value!r}."
        )


def check_positive_int(name, value, allow_none=False):
    """Raises unless `value` is a Python int of at least 1.

    Args:
        name: The argument's name, quoted in the error message.
        value: The value to check.
        allow_none: Whether `None` (the argument's default) is accepted too.

    Raises:
        TypeError: If `value` is not a Python int, or is a bool.
        ValueError: If `value` is an int below 1.

    Example:

    >>> check_positive_int("batch_size", 32)
    >>> check_positive_int("batch_size", 0)
    Traceback (most recent call last):
        ...
    ValueError: `batch_size` must be a Python int >= 1, got 0.
    """
    if value is None and allow_none:
        return
    expected = "a Python int >= 1"
    if allow_none:
        expected += " or None (the default)"
    # Python ints only: a NumPy integer breaks JSON configs and some
    # TensorFlow index ops.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"`{name}` must be {expected}, got {value!r} of type "
            f"{type(value).__name__}."
        )
    if value < 1:
        raise ValueError(f"`{name}` must be {expected}, got {value!r}.")


def check_temperature(temperature):
    check_positive_number("temperature", temperature)


def check_reduction(reduction):
    """Raises unless `reduction` is one of `REDUCTIONS`."""
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}."
        )


def check_unit_interval(name, value, include_one=True):
    """Raises unless `value` is a Python number in [0, 1] (or [0, 1))."""
    upper = "1]" if include_one else "1)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{name}` must be a Python number in [0, {upper}, got {value!r}."
        )
    in_range = 0.0 <= value <= 1.0 if include_one else 0.0 <= value < 1.0
    if not in_range:
        raise ValueError(f"`{name}` must be in [0, {upper}, got {value!r}.")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
