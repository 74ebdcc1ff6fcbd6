"""Memory budgets: slots, fractions of standard BPTT, bytes, or unlimited.

A budget says how much the backward pass may store, in one of four forms:

* slots -- hidden-state units, h_0 included (`12`, `Budget.from_slots(12)`,
  `"12"`);
* a fraction of standard BPTT's memory `1 + (t-1) * alpha` slots
  (`0.05`, `"5%"`, `Budget.from_fraction(0.05)`);
* bytes (`"256MB"`, `"1.5GiB"`, `"512KiB"`, `"1e9B"`,
  `Budget.from_bytes(268435456)`), converted with the byte size of one
  hidden state; SI prefixes are powers of 1000 (`MB` = 10**6), binary ones
  powers of 1024 (`MiB` = 2**20);
* unlimited (`None`, `math.inf`, `"unlimited"`, `"inf"`) -- standard BPTT.

`parse_budget` turns any of these into a `Budget`; `Budget.to_slots` turns a
budget into the slot count the planner takes, for one sequence length and
state size. The memory model is that of Gruslys et al., "Memory-Efficient
Backpropagation Through Time" (NIPS 2016), see `keras_bptt.planning.plan`.

Known limitations:

* A float is a fraction when it is in (0, 1] and a number of slots when it is
  larger, so `1.0` means 100% while `1` means one slot. Use
  `Budget.from_slots(1.0)` or `Budget.from_fraction(...)` to be explicit.
* `Slots`, `Fraction` and `Bytes`, the constructors' former names, still
  work but warn (`DeprecationWarning`, naming the replacement).
* Unit letters are case-insensitive (`mb` is megabytes, not megabits).
"""

import dataclasses
import math
import numbers
import re
import warnings

from keras_bptt.planning import planner

ACCEPTED_FORMS = (
    "an int number of slots (h_0 included, >= 1), a float fraction of "
    "standard BPTT's memory in (0, 1] (or a float > 1: slots), a percentage "
    "string like '5%', a byte size like '256MB', '1.5GiB' or '1e9B', a "
    "Budget (Budget.from_slots(n), Budget.from_fraction(x), "
    "Budget.from_bytes(n)), or None/'unlimited'"
)
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?"
_BUDGET_PATTERN = re.compile(rf"^({_NUMBER})\s*([a-z%]*)$")
_BYTE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SLOT_UNITS = ("", "slot", "slots")
_UNLIMITED_WORDS = ("inf", "infinite", "infinity", "unlimited", "none")


@dataclasses.dataclass(frozen=True)
class Budget:
    """A parsed memory budget.

    Attributes:
        kind: `"slots"`, `"fraction"`, `"bytes"` or `"unlimited"`.
        value: Slots, fraction in (0, 1], bytes, or `math.inf`.
    """

    kind: str
    value: float

    @property
    def is_unlimited(self):
        return self.kind == "unlimited"

    @property
    def depends_on_batch_size(self):
        """Whether `to_slots` depends on the state bytes (hence the batch)."""
        return self.kind == "bytes"

    def to_slots(self, length, hidden_bytes=None, alpha=1.0):
        """The budget in slots (h_0 included) for one sequence.

        Args:
            length: Sequence length t.
            hidden_bytes: Bytes of one hidden state (the whole batch's);
                needed by byte budgets only.
            alpha: Internal-state size in hidden-state units (fractions are
                of standard BPTT's `1 + (t-1) * alpha` slots).

        Returns:
            A float number of slots >= 1, or `math.inf` if unlimited.

        Raises:
            ValueError: if the budget is less than one slot; the message
                names the smallest budget of this kind that works.

        Example:

        >>> parse_budget("5%").to_slots(1000, alpha=3)
        149.9
        >>> parse_budget("1KiB").to_slots(1000, hidden_bytes=256)
        4.0
        """
        if self.kind == "unlimited":
            return math.inf
        if self.kind == "slots":
            return self.value
        if self.kind == "fraction":
            full = planner.standard_bptt_memory(length, alpha)
            slots = self.value * full
            if slots < 1:
                raise ValueError(
                    f"Budget {self} is {slots:.3g} slots for t={length}, "
                    f"alpha={alpha:g}: less than one slot (h_0). The smallest "
                    f"fraction that works is {_round_up(100 / full)}%."
                )
            return slots
        if hidden_bytes is None or not hidden_bytes > 0:
            raise ValueError(
                f"Budget {self} is in bytes: converting it needs the byte size "
                f"of one hidden state (hidden_bytes), got {hidden_bytes!r}."
            )
        slots = self.value / hidden_bytes
        if slots < 1:
            raise ValueError(
                f"Budget {self} holds {slots:.3g} hidden states of "
                f"{hidden_bytes:g} bytes: less than one slot (h_0). The "
                f"smallest byte budget that works is {hidden_bytes:g} bytes."
            )
        return slots

    @classmethod
    def from_slots(cls, slots):
        """A budget of `slots` hidden-state units, h_0 included (>= 1).

        Example:

        >>> Budget.from_slots(12).to_slots(1000)
        12.0
        """
        if isinstance(slots, bool) or not isinstance(slots, numbers.Real):
            raise ValueError(f"Budget.from_slots takes a number, got {slots!r}.")
        if math.isinf(slots) and slots > 0:
            return UNLIMITED
        if not slots >= 1:
            raise ValueError(
                f"A budget of {slots!r} slots cannot hold h_0: the smallest "
                "budget that works is 1 slot."
            )
        return cls("slots", float(slots))

    @classmethod
    def from_fraction(cls, fraction):
        """A budget of `fraction` (in (0, 1]) of standard BPTT's memory.

        Example:

        >>> Budget.from_fraction(0.05).to_slots(1000, alpha=3)
        149.9
        """
        value = _positive_number(fraction, "Budget.from_fraction")
        if value > 1:
            raise ValueError(
                f"A fraction of standard BPTT's memory must be in (0, 1], got "
                f"{value:g}; for unlimited memory use None."
            )
        return cls("fraction", value)

    @classmethod
    def from_bytes(cls, num_bytes):
        """A budget of `num_bytes` bytes (converted with the hidden-state size).

        Example:

        >>> Budget.from_bytes(268435456).to_slots(1000, hidden_bytes=2**20)
        256.0
        """
        return cls("bytes", _positive_number(num_bytes, "Budget.from_bytes"))

    def __str__(self):
        if self.kind == "fraction":
            return f"{self.value * 100:g}%"
        if self.kind == "bytes":
            return f"{self.value:g} bytes"
        if self.kind == "slots":
            return f"{self.value:g} slots"
        return "unlimited"


UNLIMITED = Budget("unlimited", math.inf)


def _deprecated_constructor(name, replacement):
    """`replacement` under its former name `name`, warning on each call."""

    def constructor(value):
        warnings.warn(
            f"keras_bptt.budget.{name} is deprecated; use "
            f"keras_bptt.budget.Budget.{replacement.__name__} instead.",
            DeprecationWarning,
            stacklevel=2,
        )
        return replacement(value)

    constructor.__name__ = constructor.__qualname__ = name
    constructor.__doc__ = (
        f"Deprecated alias of `Budget.{replacement.__name__}`.")
    return constructor


Slots = _deprecated_constructor("Slots", Budget.from_slots)
Fraction = _deprecated_constructor("Fraction", Budget.from_fraction)
Bytes = _deprecated_constructor("Bytes", Budget.from_bytes)


def parse_budget(value):
    """Parses a memory budget given in any accepted form (see module doc).

    Args:
        value: An int (slots), a float (fraction in (0, 1], else slots), a
            string (`"12"`, `"5%"`, `"256MB"`, `"1.5GiB"`, `"unlimited"`), a
            `Budget`, or `None` / `math.inf` (unlimited).

    Returns:
        A `Budget`.

    Raises:
        ValueError: for a malformed or non-positive budget, or one below one
            slot; the message lists the accepted forms or the smallest budget.

    Example:

    >>> parse_budget("5%"), parse_budget(12), parse_budget("1.5GiB").value
    (Budget(kind='fraction', value=0.05), Budget(kind='slots', value=12.0), 1610612736.0)
    """
    if isinstance(value, Budget):
        return value
    if value is None:
        return UNLIMITED
    if isinstance(value, str):
        return _parse_string(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Cannot read {value!r} as a memory budget; use {ACCEPTED_FORMS}.")
    if math.isinf(value) and value > 0:
        return UNLIMITED
    if isinstance(value, numbers.Integral):
        return Budget.from_slots(value)
    return _from_float(value)


def _parse_string(text):
    normalized = text.strip().lower()
    if normalized in _UNLIMITED_WORDS:
        return UNLIMITED
    match = _BUDGET_PATTERN.match(normalized)
    if match is None:
        raise ValueError(f"Cannot read {text!r} as a memory budget; use {ACCEPTED_FORMS}.")
    number, unit = match.groups()
    if unit == "%":
        return Budget.from_fraction(float(number) / 100)
    if unit in _BYTE_UNITS:
        return Budget.from_bytes(float(number) * _BYTE_UNITS[unit])
    if unit not in _SLOT_UNITS:
        raise ValueError(
            f"Unknown unit {unit!r} in memory budget {text!r}; use {ACCEPTED_FORMS}."
        )
    if re.fullmatch(r"[+-]?\d+", number):
        return Budget.from_slots(int(number))
    return _from_float(float(number))


def _from_float(value):
    if 0 < value <= 1:
        return Budget.from_fraction(value)
    return Budget.from_slots(value)


def _positive_number(value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} takes a number, got {value!r}.")
    if not (0 < value < math.inf):
        raise ValueError(
            f"{what} takes a positive finite number, got {value!r}; "
            "for unlimited memory use None."
        )
    return float(value)


def _round_up(percent):
    """`percent` rounded up to 3 significant digits (so that it works)."""
    digits = 2 - math.floor(math.log10(percent))
    scale = 10.0**digits
    return f"{math.ceil(percent * scale - 1e-9) / scale:g}"
