"""Each detector against a table of true and false cases, full-width digits included.

Order numbers, dates, phone numbers and timestamps must not count as cards or My
Numbers; a found value is only ever reported masked.
"""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.detectors import PiiKind, detect
from policies.detectors.credit_card import luhn_valid
from policies.detectors.my_number import check_digit
from policies.text import normalize


def kinds(text: str) -> list[PiiKind]:
    return [f.kind for f in detect(normalize(text))]


def masked(text: str) -> list[str]:
    return [f.masked for f in detect(normalize(text))]


CARD = PiiKind.CREDIT_CARD
MYNUM = PiiKind.MY_NUMBER
PHONE = PiiKind.PHONE_JP


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Visa 4111 1111 1111 1111", [CARD]),
        ("4111-1111-1111-1111", [CARD]),
        ("4111111111111111", [CARD]),
        ("カード番号：４１１１　１１１１　１１１１　１１１１です", [CARD]),  # full width
        ("４１１１－１１１１－１１１１－１１１１", [CARD]),
        ("MC 5555 5555 5555 4444", [CARD]),
        ("MC 2-series 2221 0000 0000 0009", [CARD]),
        ("Amex 3782 822463 10005", [CARD]),
        ("JCB 3530111333300000", [CARD]),
        ("Diners 3056 930902 5904", [CARD]),
        ("Discover 6011 1111 1111 1117", [CARD]),
        # false cases
        ("4111 1111 1111 1112", []),  # fails Luhn
        ("1234 5678 9012 3456", []),  # no issuer starts with 1
        ("9999999999999995", []),  # Luhn-valid, no issuer
        ("order 4111-1111 1111-1111", []),  # mixed separators
        ("4111 11111111 1111", []),  # not a printed layout
        ("注文番号 ORD-4111-1111-1111-1111", []),  # part of an order code
        ("INV4111111111111111", []),
        ("2024-01-15 10:30", []),
        ("20240115103000123", []),  # a timestamp with milliseconds
        ("tel 03-1234-5678", [PHONE]),
    ],
)
def test_credit_card(text: str, expected: list[PiiKind]) -> None:
    assert [k for k in kinds(text) if k is not PHONE] == [k for k in expected if k is not PHONE]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("個人番号 123456789018", True),
        ("個人番号 1234 5678 9018", True),
        ("個人番号 1234-5678-9018", True),
        ("マイナンバー：１２３４５６７８９０１８", True),  # full width
        ("1234－5678－9018", True),
        # false cases
        ("123456789012", False),  # wrong check digit
        ("1234-5678 9018", False),  # mixed separators
        ("202401150007", False),  # yyyymmddHHMM passes the check digit, but is a date
        ("注文番号 ORD-1234-5678-9018", False),
        ("1234567890185", False),  # thirteen digits
        ("2024年01月15日", False),
        ("4111 1111 1111 1111", False),  # a card's last 12 digits are not a My Number
    ],
)
def test_my_number(text: str, expected: bool) -> None:
    assert (MYNUM in kinds(text)) is expected


def test_the_timestamp_case_really_passes_the_check_digit() -> None:
    # Otherwise the date exclusion above would prove nothing.
    assert check_digit("20240115000") == 7


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("携帯 090-1234-5678", True),
        ("080 1234 5678", True),
        ("07012345678", True),
        ("０９０－１２３４－５６７８", True),
        ("090ー1234ー5678", True),  # katakana long vowel mark as a dash
        ("03-1234-5678", True),
        ("(03)1234-5678", True),
        ("0466-12-3456", True),
        ("050-1234-5678", True),
        ("0120-123-456", True),
        ("+81 90-1234-5678", True),
        ("+81-3-1234-5678", True),
        # false cases
        ("090-1234-567", False),  # too short
        ("0012345678", False),  # 00 is the international prefix
        ("2024-01-15", False),
        ("ORD-090-1234-5678", False),
        ("12345678901", False),
    ],
)
def test_phone_jp(text: str, expected: bool) -> None:
    assert (PHONE in kinds(text)) is expected


@pytest.mark.parametrize(
    ("count", "expected"),
    [(1, 0), (9, 0), (10, 11), (50, 51)],
)
def test_email_addresses_count_only_as_a_list(count: int, expected: int) -> None:
    text = "\n".join(f"customer{i}@example.com" for i in range(count))
    signature = "\n-- \ntaro@corp.example"  # one more address, as in any mail
    found = [f for f in detect(normalize(text + signature)) if f.kind is PiiKind.EMAIL_ADDRESSES]
    assert len(found) == expected


def test_email_duplicates_are_one_address() -> None:
    text = "a@example.com\n" * 50
    assert kinds(text) == []


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("4111 1111 1111 1111", "4111 **** **** 1111"),
        ("378282246310005", "3782 **** *** 0005"),
        ("123456789018", "**** **** 9018"),
        ("090-1234-5678", "090-****-5678"),
    ],
)
def test_values_are_masked(text: str, shown: str) -> None:
    assert masked(text) == [shown]


def test_a_full_value_never_appears_in_findings() -> None:
    text = "4111111111111111 123456789018 090-1234-5678 " + " ".join(
        f"user{i}@example.com" for i in range(12))
    for finding in detect(normalize(text)):
        assert "4111111111111111" not in finding.masked
        assert "123456789018" not in finding.masked
        assert "1234-5678" not in finding.masked
        assert "user" not in finding.masked.split("@")[0][1:]


@pytest.mark.parametrize(("number", "valid"), [("79927398713", True), ("79927398710", False)])
def test_luhn(number: str, valid: bool) -> None:
    assert luhn_valid(number) is valid


_JAPANESE = st.text(
    alphabet=st.sampled_from(
        "あいうえおがぎゃアイウエオガヴー・、。「」（）：　ＡＢＣａｂｃ０１２３４５６７８９－"
        "ｱｲｳｶﾞﾟ①㈱〶ゟヿ\u3099\u309a漢字ﾃﾞｰﾀ ABCabc0123456789-"
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(_JAPANESE)
def test_fast_normalisation_equals_nfkc(text: str) -> None:
    assert normalize(text) == unicodedata.normalize("NFKC", text)
