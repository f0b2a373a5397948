"""Values are written as Go's encoding/json writes them (what pgwatch stores), in every JSON sink."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import re

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reaper.measurement import Measurement
from reaper.sinks import spill
from reaper.sinks.encode import dumps, go_float_text
from reaper.sinks.jsonfile import encode_measurement
from reaper.sinks.postgres import dumps_json

# What Go 1.2x's json.Marshal(float64) writes (encoding/json floatEncoder: strconv 'f' or 'e' with the
# shortest digits, 'e' below 1e-6 and from 1e21 on, "e-07" cleaned up to "e-7").
GO_TEXT = [
    (300.0, "300"),
    (0.0, "0"),
    (-0.0, "-0"),
    (-12.0, "-12"),
    (0.5, "0.5"),
    (123456.789, "123456.789"),
    (0.1 + 0.2, "0.30000000000000004"),
    (1e-5, "0.00001"),
    (1.5e-5, "0.000015"),
    (1e-6, "0.000001"),
    (9.99e-7, "9.99e-7"),
    (1e-7, "1e-7"),
    (1.5e-10, "1.5e-10"),
    (5e-324, "5e-324"),
    (1e15, "1000000000000000"),
    (2.0**53, "9007199254740992"),
    (1e20, "100000000000000000000"),
    (1.2345678901234568e20, "123456789012345680000"),
    (999999999999999900000.0, "999999999999999900000"),
    (1e21, "1e+21"),
    (1.5e22, "1.5e+22"),
    (-1.7976931348623157e308, "-1.7976931348623157e+308"),
]

FLOAT_RE = re.compile(r"^-?(0|[1-9][0-9]*)(\.[0-9]*[1-9])?$")  # plain form: no exponent, no trailing zero
EXP_RE = re.compile(r"^-?[1-9](\.[0-9]*[1-9])?e[+-][1-9][0-9]*$")  # Go's exponent form after its clean-up


@pytest.mark.parametrize(("value", "text"), GO_TEXT, ids=[t for _, t in GO_TEXT])
def test_floats_are_written_as_go_writes_them(value: float, text: str) -> None:
    assert go_float_text(value) == text
    assert dumps(value) == text.encode()
    assert dumps({"v": [value]}) == b'{"v":[' + text.encode() + b"]}"


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_any_float_reads_back_equal_in_go_form(value: float) -> None:
    text = dumps({"v": value}).decode()[5:-1]
    assert text == go_float_text(value)
    assert float(text) == value  # the shortest text still reads back as the same float64
    if value != 0 and not 1e-6 <= abs(value) < 1e21:
        assert EXP_RE.match(text), text
    else:
        assert FLOAT_RE.match(text) or text == "-0", text
    if value.is_integer() and abs(value) < 1e21:
        assert "." not in text and "e" not in text  # (data->>'col')::int8 reads it


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, decimal.Decimal("NaN"), decimal.Decimal("Infinity")])
def test_nan_and_infinities_are_null(value: object) -> None:
    assert dumps({"v": value}) == b'{"v":null}'


def test_integers_stay_integers_and_big_ones_keep_their_digits() -> None:
    assert dumps({"a": 1, "b": -(2**63), "c": 2**64 - 1, "d": 2**70, "e": True}) == (
        b'{"a":1,"b":-9223372036854775808,"c":18446744073709551615,"d":1180591620717411303424,"e":true}')


def test_decimals_keep_their_exact_text_and_integral_ones_drop_the_zero_fraction() -> None:
    values = {"a": decimal.Decimal("300.00"), "b": decimal.Decimal("0.50"), "c": decimal.Decimal("1E+25"),
              "d": decimal.Decimal("-12345678901234567890.123456789"), "e": decimal.Decimal("0.0000001")}
    assert dumps(values) == (b'{"a":300,"b":0.50,"c":10000000000000000000000000,'
                             b'"d":-12345678901234567890.123456789,"e":0.0000001}')


def test_other_types_as_before() -> None:
    values = {"t": dt.timedelta(seconds=90), "h": dt.timedelta(microseconds=5), "b": b"\x01\xff",
              "at": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC), "s": "x"}
    assert json.loads(dumps(values)) == {"t": 90, "h": 0.000005, "b": "01ff",
                                         "at": "2024-01-02T03:04:05+00:00", "s": "x"}
    assert dumps({"t": dt.timedelta(seconds=90)}) == b'{"t":90}'


def test_the_input_is_not_changed() -> None:
    row = {"a": 1.0, "nested": {"b": [2.0, 0.5]}}
    dumps(row)
    assert row == {"a": 1.0, "nested": {"b": [2.0, 0.5]}} and type(row["a"]) is float


def _measurement() -> Measurement:
    rows = ({"epoch_ns": 1_700_000_000_000_000_000, "value": 300.0, "ratio": 0.25, "tiny": 3e-6,
             "n": decimal.Decimal("7.00"), "tag_name": "x"},)
    return Measurement(source="main", metric="settings_num", table="settings_num", epoch_ns=1, rows=rows, tags={})


def test_every_json_sink_writes_go_text() -> None:
    m = _measurement()
    expected = b'"value":300,"ratio":0.25,"tiny":0.000003,"n":7'
    assert expected in encode_measurement(m)
    assert expected in spill.encode(m)
    assert expected.decode() in dumps_json(m.rows[0])
    back = spill.decode(spill.encode(m))
    assert back.rows[0]["value"] == 300 and back.rows[0]["tiny"] == 3e-6


def test_postgres_text_has_no_nul_escape() -> None:
    assert dumps_json({"s": "a\x00b", "v": 1.0}) == '{"s":"ab","v":1}'


def test_orjson_alone_would_write_a_fraction() -> None:
    """Why the encoder exists: orjson (and Python's json) write 300.0, which ::int8 rejects."""
    assert orjson.dumps(300.0) == b"300.0"


def test_bit_strings_and_ranges_are_written_in_postgresqls_text_form() -> None:
    import asyncpg

    row = {"bits": asyncpg.BitString("101"), "r": asyncpg.Range(1, 5), "closed": asyncpg.Range(1, 5, upper_inc=True),
           "open": asyncpg.Range(None, 3), "none": asyncpg.Range(empty=True)}
    assert orjson.loads(dumps(row)) == {"bits": "101", "r": "[1,5)", "closed": "[1,5]", "open": "(,3)", "none": "empty"}
