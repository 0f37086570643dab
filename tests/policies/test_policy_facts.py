"""Facts from real-shaped messages: every attachment found, its name decoded, its type
detected from its bytes, its markers and its contents seen."""

from __future__ import annotations

import pytest
from messages import (
    PNG,
    XLSX_TYPE,
    b64,
    content_type_name_only,
    docx,
    encrypted_zip,
    forwarded,
    html_inline_image_and_xlsx,
    ooxml,
    outlook_iso2022jp,
    pdf,
    plain,
    plain_zip,
    pptx,
    simple,
    swaks_shift_jis,
    thunderbird_rfc2231,
    xlsx,
)
from policy_samples import NOW

from policies.engine import Policy, inspect
from policies.envelope import Envelope
from policies.facts import AttachmentFacts, MessageFacts
from policies.filetype import FileType
from policies.mime import decoded_payload, parse

OLE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # [MS-CFB] compound file signature
ENVELOPE = Envelope(mail_from="taro@corp.example", rcpt_tos=("hanako@acme.example",))


def facts_of(raw: bytes, policy: Policy) -> MessageFacts:
    inspection = inspect(raw, ENVELOPE, policy, NOW)
    assert inspection.facts is not None, inspection.verdict
    return inspection.facts


def only(facts: MessageFacts) -> AttachmentFacts:
    assert len(facts.attachments) == 1, facts.attachments
    return facts.attachments[0]


def one_file(
    name: str, data: bytes, policy: Policy, declared: str = "application/octet-stream"
) -> AttachmentFacts:
    return only(facts_of(simple("", [(name, data, declared)]), policy))


@pytest.mark.parametrize(
    ("raw", "name", "detected"),
    [
        (outlook_iso2022jp("ＡＣＭＥ様_見積書.xlsx", xlsx(["x"])), "ＡＣＭＥ様_見積書.xlsx",
         FileType.XLSX),
        (thunderbird_rfc2231("アクメ顧客一覧（最新版）.csv", b"a,b\n1,2\n"),
         "アクメ顧客一覧（最新版）.csv", FileType.CSV),
        (swaks_shift_jis("アクメ請求書.pdf", pdf()), "アクメ請求書.pdf", FileType.PDF),
        (content_type_name_only("ACME-scan.pdf", pdf()), "ACME-scan.pdf", FileType.PDF),
    ],
    ids=["outlook-iso2022jp-rfc2047-quoted", "thunderbird-rfc2231", "swaks-raw-shift-jis",
         "content-type-name-only"],
)
def test_attachment_name_is_decoded_and_marked(
    raw: bytes, name: str, detected: FileType, book_policy: Policy
) -> None:
    attachment = only(facts_of(raw, book_policy))
    assert attachment.name == name
    assert attachment.detected_type is detected
    assert attachment.clients == {"acme"}


def test_outlook_iso2022jp_subject_and_body_are_decoded(book_policy: Policy) -> None:
    facts = facts_of(outlook_iso2022jp("a.xlsx", xlsx([])), book_policy)
    assert facts.subject == "お見積りの件"
    assert "見積書を送付します" in facts.body_text


def test_html_with_inline_image_counts_only_the_xlsx_beside_it(book_policy: Policy) -> None:
    raw = html_inline_image_and_xlsx("<p>カード 4111-1111-1111-1111</p>", PNG, "list.xlsx",
                                     xlsx(["ベータ商事 様"]))
    facts = facts_of(raw, book_policy)
    attachment = only(facts)
    assert (attachment.name, attachment.detected_type) == ("list.xlsx", FileType.XLSX)
    assert attachment.clients == {"beta"}
    assert [m.where for m in attachment.marks] == ["text"]
    assert [f.masked for f in facts.body_pii] == ["4111 **** **** 1111"]


def test_forwarded_message_carries_its_file(book_policy: Policy) -> None:
    inner = simple("inner", [("ACME.csv", b"4111111111111111\n", "text/csv")])
    facts = facts_of(forwarded(inner), book_policy)
    names = [(a.name, a.inside_message) for a in facts.attachments]
    assert names == [("forwarded.eml", False), ("ACME.csv", True)]
    assert facts.attachments[1].pii[0].masked == "4111 **** **** 1111"
    assert facts.attachments[0].size > 0


@pytest.mark.parametrize(
    ("name", "data", "declared", "detected"),
    [
        ("report.txt", xlsx(["a"]), "text/plain", FileType.XLSX),  # renamed to hide it
        ("memo.docx", docx(["hello"]), "application/octet-stream", FileType.DOCX),
        ("deck.pptx", pptx(["hi"]), "application/octet-stream", FileType.PPTX),
        ("photo.jpg", PNG, "image/jpeg", FileType.PNG),
        ("archive.bin", plain_zip({"a.txt": b"x"}), "application/octet-stream", FileType.ZIP),
        ("data", b'{"a": 1}', "application/json", FileType.JSON),
        ("x.tsv", b"a\tb\n", "text/plain", FileType.TSV),
        ("blob.dat", bytes(range(256)), "application/octet-stream", FileType.BINARY),
    ],
)
def test_type_is_detected_from_magic_bytes(
    name: str, data: bytes, declared: str, detected: FileType, book_policy: Policy
) -> None:
    assert one_file(name, data, book_policy, declared).detected_type is detected


@pytest.mark.parametrize(
    ("data", "encrypted"),
    [
        (encrypted_zip({"a.csv": b"1"}), True),
        (plain_zip({"a.csv": b"1"}), False),
        (pdf(encrypted=True), True),
        (pdf(), False),
        (OLE + b"\x00" * 64 + "EncryptedPackage".encode("utf-16-le"), True),  # locked .xlsx
        (OLE + b"\x00" * 64 + "Workbook".encode("utf-16-le"), False),  # an old .xls
    ],
)
def test_encrypted_zip_and_pdf_are_recognised(
    data: bytes, encrypted: bool, book_policy: Policy
) -> None:
    assert one_file("f", data, book_policy).encrypted is encrypted


def test_zip_entry_names_are_listed_and_marked_including_cp932(book_policy: Policy) -> None:
    archive = plain_zip({"アクメ/顧客.csv": b"x", "readme.txt": b"y"}, cp932_names=True)
    attachment = one_file("files.zip", archive, book_policy, "application/zip")
    assert attachment.entries == ("アクメ/顧客.csv", "readme.txt")
    assert [(m.client, m.where) for m in attachment.marks] == [("acme", "entry アクメ/顧客.csv")]


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (docx(["マイナンバー 1234 5678 9018"]), "m.docx"),  # split over two runs
        (xlsx(["123456789018"]), "m.xlsx"),
        (pptx(["123456789018"]), "m.pptx"),
        ("123456789018".encode("cp932"), "m.csv"),
        ("個人番号 1234-5678-9018".encode("iso-2022-jp"), "m.txt"),
    ],
)
def test_text_inside_office_and_text_files_is_inspected(
    data: bytes, name: str, book_policy: Policy
) -> None:
    attachment = one_file(name, data, book_policy)
    assert [f.masked for f in attachment.pii] == ["**** **** 9018"]


def test_markers_match_full_width_half_width_and_case(book_policy: Policy) -> None:
    files = [("ａｃｍｅ-1.csv", b"x", "text/csv"), ("ｱｸﾒ.csv", b"x", "text/csv"),
             ("acmedia.csv", b"x", "text/csv"), ("acme2024.csv", b"x", "text/csv")]
    facts = facts_of(simple("", files), book_policy)
    assert [a.clients == {"acme"} for a in facts.attachments] == [True, True, False, True]


def test_recipients_are_classified_internal_external_and_by_client(book_policy: Policy) -> None:
    envelope = Envelope(mail_from="taro@corp.example",
                        rcpt_tos=("a@corp.example", "b@sales.acme.example", "c@beta.example",
                                  "d@other.example"))
    facts = inspect(plain("hi"), envelope, book_policy, NOW).facts
    assert facts is not None
    assert [(r.internal, r.client) for r in facts.recipients] == [
        (True, None), (False, "acme"), (False, "beta"), (False, None)]


def test_limits_become_a_fact_not_a_crash(book_policy: Policy) -> None:
    many = simple("", [(f"f{i}.txt", b"x", "text/plain") for i in range(2100)])
    facts = facts_of(many, book_policy)
    assert any("parts" in reason for reason in facts.not_fully_inspected)
    assert len(facts.attachments) < 2100


def test_large_text_attachment_is_cut_at_the_budget(book_policy: Policy) -> None:
    big = b"0123456789\n" * 300_000  # 3.3 MB of text
    facts = facts_of(simple("", [("big.csv", big, "text/csv")]), book_policy)
    assert facts.not_fully_inspected
    assert "not inspected" in facts.not_fully_inspected[0]


def test_html_body_is_reduced_to_text(book_policy: Policy) -> None:
    raw = html_inline_image_and_xlsx("<style>p{}</style><p>Hello&nbsp;<b>World</b></p>", PNG,
                                     "a.xlsx", xlsx([]))
    facts = facts_of(raw, book_policy)
    assert "Hello\xa0World" in facts.body_text or "Hello World" in facts.body_text
    assert "p{}" not in facts.body_text


def test_xlsx_attachment_declared_type_is_kept(book_policy: Policy) -> None:
    facts = facts_of(outlook_iso2022jp("a.xlsx", xlsx([])), book_policy)
    assert only(facts).declared_type == XLSX_TYPE


@pytest.mark.parametrize(
    "body",
    [
        b64(bytes(range(256)) * 40),
        b64(b"abc") + "\r\n\r\n",
        "QUJD\r\n!!RE\r\nVG\r\n",  # characters outside the alphabet are skipped
        "QUJDRA",  # missing padding: the email package's lenient path
        "",
    ],
)
@pytest.mark.parametrize("encoding", ["base64", "BASE64 ", "8bit", "quoted-printable"])
def test_fast_decoding_equals_the_email_package(body: str, encoding: str) -> None:
    raw = (f"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: {encoding}"
           f"\r\n\r\n{body}\r\nおしまい=E3=81=82").encode()
    part = parse(raw)
    assert decoded_payload(part) == part.get_payload(decode=True)


def test_shared_strings_are_read_before_a_sheet_that_spends_the_budget(
    book_policy: Policy,
) -> None:
    # Excel writes sharedStrings.xml after the sheets; typed numbers live there.
    filler = "<row><c t=\"inlineStr\"><is><t>" + "x" * 500_000 + "</t></is></c></row>"
    workbook = ooxml({
        "xl/worksheets/sheet1.xml": f"<worksheet><sheetData>{filler}</sheetData></worksheet>",
        "xl/sharedStrings.xml": "<sst><si><t>個人番号 123456789018</t></si></sst>",
    })
    facts = facts_of(simple("", [("big.xlsx", workbook, XLSX_TYPE)]), book_policy)
    assert [f.masked for f in only(facts).pii] == ["**** **** 9018"]
    assert any("sheet1.xml" in reason for reason in facts.not_fully_inspected)
