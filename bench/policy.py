"""Policy evaluation time per message: a 5 KB text mail and a mail with a 5 MB xlsx.

    python bench/policy.py [--runs N]

Prints mean/p50/p99 of `policies.engine.inspect` (what the gateway calls: MIME parse,
facts, every rule) and, separately, of the same work after the stdlib MIME parse, so
that the engine's own cost can be told from `email.parser`'s. Targets: under 1 ms for
the text mail, bounded (under 50 ms) for the xlsx mail.
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import time
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from policies.combine import combine
from policies.engine import Policy, inspect
from policies.envelope import Envelope
from policies.facts import build_facts
from policies.mime import parse
from policies.rules import evaluate
from policies.verdict import Verdict

RULES: list[dict[str, Any]] = [
    {"name": "wrong-client-attachment",
     "description": "A file marked for one client is going to another",
     "when": {"attachment_client_mismatch": True}, "action": "refuse",
     "reason": "添付ファイルが宛先と異なる取引先のものです / attachment belongs to another client"},
    {"name": "personal-data", "when": {"pii": ["my_number", "credit_card"], "pii_min": 1},
     "action": "hold", "approvers": ["group:compliance"]},
    {"name": "external-attachments",
     "when": {"recipients": "any_external", "has_attachments": True},
     "action": "delay", "delay": "5m", "encrypt": True},
    {"name": "many-external-recipients", "when": {"external_recipients_at_least": 5},
     "bcc": True},
    {"name": "customer-list",
     "when": {"attachment_type": ["xlsx", "csv"], "pii": ["email_addresses", "phone_jp"],
              "pii_min": 20},
     "action": "hold"},
    {"name": "confidential", "when": {"subject_matches": ["(?i)社外秘|confidential"]},
     "action": "hold"},
]
CLIENTS = [
    {"name": "acme", "domains": ["acme.example", "*.acme.example"], "markers": ["ACME", "アクメ"]},
    {"name": "beta", "domains": ["beta.example"], "markers": ["BETA", "ベータ商事"]},
]
ENVELOPE = Envelope(mail_from="taro@corp.example",
                    rcpt_tos=("hanako@acme.example", "jiro@corp.example"))
NOW = datetime(2024, 1, 15, tzinfo=UTC)


BODY = """株式会社アクメ
営業部 山田様

いつもお世話になっております。コーポレーションの田中です。
先日はお打ち合わせのお時間をいただき、誠にありがとうございました。
ご依頼いただいておりました件につきまして、下記のとおりご連絡いたします。

1. 納品予定日：2024年1月25日（木）
2. ご注文番号：ORD-2024-0115-0001
3. 数量：120個（前回と同じ仕様です）
4. お支払い条件：月末締め翌月末払い

なお、仕様の変更がございましたら、1月19日までにお知らせいただけますと幸いです。
ご不明な点がございましたら、お気軽にお問い合わせください。
引き続きどうぞよろしくお願いいたします。

On Mon, 15 Jan 2024 at 10:00, Yamada <yamada@acme.example> wrote:
> Thank you for the meeting last week. Could you send us the delivery schedule
> and the order confirmation? We would also like to confirm the payment terms.
> Best regards,
> Yamada

--
田中 太郎 / Taro Tanaka
コーポレーション株式会社 営業部
TEL 03-1234-5678  FAX 03-1234-5679
taro@corp.example
"""


def text_mail() -> bytes:
    message = EmailMessage()
    message["From"], message["To"] = "taro@corp.example", "yamada@acme.example"
    message["Subject"] = "納品予定のご連絡"
    filler = "ご確認のほど、よろしくお願いいたします。\n"
    body = BODY
    while len(body.encode()) < 4000:
        body += filler
    message.set_content(body, cte="8bit")
    return bytes(message)


def xlsx_mail(size: int = 5 * 1024 * 1024) -> bytes:
    """A workbook of about `size` bytes: a big sheet of customer-like rows, and an image."""
    message = EmailMessage()
    message["From"], message["To"] = "taro@corp.example", "hanako@acme.example"
    message["Subject"] = "売上データ"
    message.set_content("売上データを送ります。")
    message.add_attachment(_workbook(size), maintype="application",
                           subtype="vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                           filename="ACME_売上.xlsx")
    return bytes(message)


def _workbook(size: int) -> bytes:
    rng = random.Random(1)
    rows = "".join(
        f'<row r="{i}"><c t="inlineStr"><is><t>顧客{rng.getrandbits(64):x}</t></is></c>'
        f"<c><v>{rng.random():.6f}</v></c><c><v>{rng.randrange(1, 10**6)}</v></c></row>"
        for i in range(120_000)
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("xl/workbook.xml", "<workbook/>")
        archive.writestr("xl/worksheets/sheet1.xml",
                         f"<worksheet><sheetData>{rows}</sheetData></worksheet>")
        names = "<si><t>ACME 御中</t></si>" * 100
        archive.writestr("xl/sharedStrings.xml", f"<sst>{names}</sst>")
        padding = max(0, size - len(buffer.getvalue()))
        archive.writestr("xl/media/image1.png", rng.randbytes(padding))
    return buffer.getvalue()


def measure(work: Callable[[], object], runs: int) -> list[float]:
    work()  # warm up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append((time.perf_counter() - start) * 1000)
    return times


def show(label: str, times: list[float]) -> None:
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(f"  {label:<28} mean {statistics.fmean(times):8.3f} ms"
          f"   p50 {statistics.median(times):8.3f} ms   p99 {p99:8.3f} ms")


def run_case(label: str, raw: bytes, runs: int, policy: Policy) -> None:
    result = inspect(raw, ENVELOPE, policy, NOW)
    cut = len(result.facts.not_fully_inspected) if result.facts else "-"
    print(f"{label}: {len(raw)} bytes, verdict {result.verdict.action.value} "
          f"({result.verdict.rule}), not-fully-inspected reasons: {cut}")
    message = parse(raw)
    show("inspect (parse+facts+rules)", measure(lambda: inspect(raw, ENVELOPE, policy, NOW), runs))
    show("stdlib MIME parse only", measure(lambda: parse(raw), runs))
    show("facts + rules (engine)", measure(lambda: engine_only(message, policy), runs))


def engine_only(message: Message, policy: Policy) -> Verdict:
    facts = build_facts(message, ENVELOPE, policy.clients, policy.internal_domains)
    traces = [evaluate(rule, facts, frozenset()) for rule in policy.rules]
    return combine(policy.rules, traces)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=0, help="runs per case (default 2000 / 30)")
    args = parser.parse_args()
    policy = Policy.compile(RULES, CLIENTS, ["corp.example"])
    run_case("5 KB text mail", text_mail(), args.runs or 2000, policy)
    run_case("5 MB xlsx mail", xlsx_mail(), args.runs or 30, policy)


if __name__ == "__main__":
    main()
