"""Budgets: parsing every accepted form, converting to slots, clear errors."""

import math

import pytest

from keras_bptt.planning import budget as budget_lib
from keras_bptt.planning import planner
from keras_bptt.planning.budget import Budget, parse_budget


@pytest.mark.parametrize(
    "value, kind, amount",
    [
        (12, "slots", 12),
        ("12", "slots", 12),
        (" 3 slots", "slots", 3),
        (12.5, "slots", 12.5),
        (0.05, "fraction", 0.05),
        ("0.05", "fraction", 0.05),
        (1.0, "fraction", 1.0),
        ("5%", "fraction", 0.05),
        ("100%", "fraction", 1.0),
        ("256MB", "bytes", 256e6),
        ("256 mb", "bytes", 256e6),
        ("256MiB", "bytes", 256 * 2**20),
        ("1.5GiB", "bytes", 1.5 * 2**30),
        ("512KiB", "bytes", 512 * 1024),
        ("2kB", "bytes", 2000),
        ("1e9B", "bytes", 1e9),
        ("1TB", "bytes", 1e12),
    ],
)
def test_accepted_forms(value, kind, amount):
    parsed = parse_budget(value)
    assert parsed.kind == kind
    assert parsed.value == pytest.approx(amount)


@pytest.mark.parametrize("value", [None, math.inf, "inf", "unlimited", "None", Budget.from_slots(math.inf)])
def test_unlimited(value):
    parsed = parse_budget(value)
    assert parsed.is_unlimited
    assert parsed.to_slots(1000, alpha=3) == math.inf


def test_helpers_and_budget_objects_pass_through():
    assert parse_budget(Budget.from_bytes(268435456)) == Budget("bytes", 268435456.0)
    assert parse_budget(Budget.from_fraction(0.25)) == parse_budget("25%")
    assert parse_budget(Budget.from_slots(7)) == parse_budget(7)
    assert Budget.from_bytes(100).depends_on_batch_size
    assert not parse_budget("5%").depends_on_batch_size
    assert str(parse_budget("5%")) == "5%" and str(Budget.from_slots(3)) == "3 slots"


@pytest.mark.parametrize(
    "old, new, value",
    [("Slots", "from_slots", 7), ("Fraction", "from_fraction", 0.25),
     ("Bytes", "from_bytes", 2**28)],
)
def test_former_constructor_names_warn_and_still_work(old, new, value):
    with pytest.warns(DeprecationWarning, match=f"Budget.{new}"):
        budget = getattr(budget_lib, old)(value)
    assert budget == getattr(Budget, new)(value)


def test_to_slots_conversions():
    full = planner.standard_bptt_memory(1000, 3)
    assert parse_budget("5%").to_slots(1000, alpha=3) == pytest.approx(0.05 * full)
    assert parse_budget(0.5).to_slots(11, alpha=2) == pytest.approx(10.5)
    assert parse_budget(40).to_slots(1000, hidden_bytes=1, alpha=3) == 40
    assert parse_budget("1MiB").to_slots(10, hidden_bytes=4096) == 256
    assert parse_budget("1MB").to_slots(10, hidden_bytes=4000) == 250


def test_a_full_fraction_runs_standard_bptt():
    slots = parse_budget("100%").to_slots(64, alpha=2.5)
    assert planner.make_plan(64, slots, "auto", alpha=2.5).cost == 64


@pytest.mark.parametrize("value", [0, -3, 0.0, -0.5, float("nan"), "0", "-1 slots"])
def test_below_one_slot(value):
    with pytest.raises(ValueError, match="smallest budget that works is 1 slot"):
        parse_budget(value)
    with pytest.raises(ValueError, match="smallest budget that works is 1 slot"):
        Budget.from_slots(0.5)


def test_fraction_below_one_slot_names_the_smallest_fraction():
    budget = parse_budget("0.01%")
    with pytest.raises(ValueError, match=r"smallest fraction that works is 0\.0334%"):
        budget.to_slots(1000, alpha=3)
    # The suggested fraction does work.
    assert parse_budget("0.0334%").to_slots(1000, alpha=3) >= 1


def test_bytes_below_one_slot_names_the_smallest_byte_budget():
    with pytest.raises(ValueError, match="smallest byte budget that works is 1024 bytes"):
        parse_budget("100B").to_slots(1000, hidden_bytes=1024)
    with pytest.raises(ValueError, match="needs the byte size of one hidden state"):
        parse_budget("100B").to_slots(1000)


@pytest.mark.parametrize(
    "value, message",
    [
        ("abc", "Cannot read 'abc'"),
        ("", "Cannot read ''"),
        ("5 parsecs", "Unknown unit 'parsecs'"),
        ([1], "Cannot read"),
        (True, "Cannot read True"),
        ("0%", "positive"),
        ("150%", r"must be in \(0, 1\]"),
        ("-2MB", "positive"),
    ],
)
def test_malformed_budgets_list_the_accepted_forms(value, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_budget(value)
    if "Cannot read" in message or "Unknown unit" in message:
        assert budget_lib.ACCEPTED_FORMS in str(info.value)
