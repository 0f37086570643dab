"""Each detector against a table of true and false cases, full-width digits included.

Order numbers, dates, phone numbers and timestamps must not count as cards or My
Numbers; a found value is only ever reported masked.
"""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.detectors import (
    Finding,
    PiiKind,
    credit_card,
    detect,
    email_addresses,
    my_number,
    phone_jp,
)
from policies.detectors.credit_card import luhn_valid
from policies.detectors.my_number import check_digit
from policies.text import for_detectors, normalize


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


def _detect_turning_the_whole_text(normalized: str) -> list[Finding]:
    """`detect` as it was: dashes turned in the whole text, then the runs cut from it,
    and the address list looked for whatever the number of "@"."""
    if not normalized:
        return []
    text = for_detectors(normalized)
    run = re.compile(r"[\d+(](?<!\d[\d+(])[\d ()+-]{8,}\d")
    runs = "\n".join(text[max(0, m.start() - 2) : m.end() + 2] for m in run.finditer(text))
    found = [f for find in (credit_card.find, my_number.find, phone_jp.find) for f in find(runs)]
    distinct = dict.fromkeys(a.lower() for a in email_addresses._ADDRESS.findall(text))
    if len(distinct) > email_addresses.LIST_THRESHOLD:
        found += [Finding(PiiKind.EMAIL_ADDRESSES, email_addresses.mask(a)) for a in distinct]
    return found


_PII_TEXT = st.lists(
    st.sampled_from([
        "4111 1111 1111 1111", "4111‐1111‐1111‐1111", "5555ー5555ー5555ー4444",
        "3782 822463 10005", "1234-5678-9018", "123456789018", "1234−5678−9018",
        "090-1234-5678", "０９０ー１２３４ー５６７８",
        "+81 90 1234 5678", "(03) 1234-5678", "03–1234–5678", "0120-123-456", "202401151230",
        "ORD-2024-0115-0001", "a.b@x.example", "c‐d@y.example", "@", "@@", " ", "-", "ー", "－",
        "(", ")", "+", "\n", "٣٣٣٣", "コーポレーション", "年", "a", "Z", "9", "0", ".",
    ]) | st.text(alphabet="0123456789 -‐ー()+@.abcxyz年", max_size=12),
    max_size=40,
).map("".join)


@settings(max_examples=500, deadline=None)
@given(_PII_TEXT)
def test_turning_only_the_runs_finds_what_turning_the_whole_text_found(text: str) -> None:
    normalized = normalize(text)
    assert list(detect(normalized)) == _detect_turning_the_whole_text(normalized)


def test_an_address_list_is_found_with_just_enough_at_signs() -> None:
    listed = " ".join(f"u{n}‐x@d{n}.example" for n in range(email_addresses.LIST_THRESHOLD + 1))
    found = [f.masked for f in detect(normalize(listed))]
    assert len(found) == email_addresses.LIST_THRESHOLD + 1
    assert found[0] == "u***@d0.example"  # the dash variant was turned before matching
    assert detect(normalize(listed.rsplit(" ", 1)[0])) == ()


_ASCII_PII_TEXT = st.lists(
    st.sampled_from([
        "4111 1111 1111 1111", "1234-5678-9018", "090-1234-5678", "+81 90 1234 5678",
        "(03) 1234-5678", "202401151230", "ORD-2024-0115-0001", "a.b@x.example", "@",
    ]) | st.text(alphabet="0123456789 -()+@.abcXYZ\t\n", max_size=12),
    max_size=40,
).map("".join)


@settings(max_examples=500, deadline=None)
@given(_ASCII_PII_TEXT)
def test_ascii_text_is_scanned_as_unicode_text_would_be(text: str) -> None:
    assert text.isascii()
    assert list(detect(text)) == _detect_turning_the_whole_text(text)


def test_ascii_text_without_digits_has_no_number_findings() -> None:
    prose = "The quick brown fox jumps over the lazy dog, then files its weekly report.\n" * 60
    assert detect(prose) == ()
    assert [f.kind for f in detect(prose + "card 4111 1111 1111 1111")] == [PiiKind.CREDIT_CARD]
