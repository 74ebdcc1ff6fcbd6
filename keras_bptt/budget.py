"""`keras_bptt.budget`: the public path of memory budgets.

The public names of `keras_bptt.planning.budget`, where they are defined
and documented: `parse_budget`, `Budget` (`Budget.from_slots`,
`from_fraction`, `from_bytes`, `to_slots`), `UNLIMITED`, `ACCEPTED_FORMS`
and the deprecated constructors `Slots`, `Fraction` and `Bytes`. The same
objects, not copies; importing this module does not import TensorFlow.
"""

from keras_bptt.planning.budget import (  # noqa: F401
    ACCEPTED_FORMS,
    UNLIMITED,
    Budget,
    Bytes,
    Fraction,
    Slots,
    parse_budget,
)
