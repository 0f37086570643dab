"""CPU time of inspection and intake bookkeeping per message, under the shipped rules.

    python bench/policy.py [--rules shipped|relay|bench] [--tree PATH] [--repeats R]

Cases: a 5 KB Japanese text mail, the same with a small xlsx attached, and a mail with a
5 MB xlsx. For each, the CPU time (`time.thread_time`) per message of:

- `inspect`: what the gateway calls (MIME parse, facts, every rule, combine);
- the MIME parse alone (`parse_message`: the email package's work), so that the
  engine's own cost can be told from `email`'s;
- intake bookkeeping: the message id and the verdict and attachment records stored.

Each figure is the median over `--repeats` batches. `--rules shipped` (the default)
takes every example rule and client of gateway.toml, uncommented; `relay` those of
bench/compare.py; `bench` this file's own set. `--tree` imports the gateway from another
checkout (e.g. a `git worktree` of the previous commit) to compare old and new in one
session. Targets: well under 1 ms for the text mail, bounded (under 50 ms) for the xlsx.
"""

from __future__ import annotations

import argparse
import io
import itertools
import random
import statistics
import sys
import time
import tomllib
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2024, 1, 15, tzinfo=UTC)

# Imported by `load`, from this checkout or the one given with --tree.
Policy: Any
Inspection: Any
inspect: Any
parse_message: Any
new_id: Any
intake: Any
ENVELOPE: Any


def load(tree: Path) -> None:
    global Policy, Inspection, inspect, parse_message, new_id, intake, ENVELOPE
    sys.path.insert(0, str(tree.resolve()))
    import gateway.intake as intake
    from gateway.ids import new_id
    from policies.engine import Inspection, Policy, inspect
    from policies.envelope import Envelope
    from policies.parsed import parse_message

    ENVELOPE = Envelope(mail_from="taro@corp.example",
                        rcpt_tos=("hanako@acme.example", "jiro@corp.example"))


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


def text_mail(n: int = 0) -> bytes:
    message = EmailMessage()
    message["From"], message["To"] = "taro@corp.example", "yamada@acme.example"
    message["Subject"] = f"納品予定のご連絡 (No. {n})"
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


def small_xlsx_mail(n: int = 0) -> bytes:
    """The text mail with a small workbook (a quote of 40 rows) attached."""
    message = EmailMessage()
    message["From"], message["To"] = "taro@corp.example", "yamada@acme.example"
    message["Subject"] = f"お見積りの送付 (No. {n})"
    message.set_content(BODY, cte="8bit")
    rows = "".join(f'<row r="{i}"><c t="inlineStr"><is><t>品目{i} 仕様A-{i:03d}</t></is></c>'
                   f"<c><v>{i * 1200}</v></c></row>" for i in range(1, 41))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("xl/workbook.xml", "<workbook/>")
        archive.writestr("xl/worksheets/sheet1.xml",
                         f"<worksheet><sheetData>{rows}</sheetData></worksheet>")
        archive.writestr("xl/sharedStrings.xml", "<sst><si><t>見積書</t></si></sst>")
    message.add_attachment(buffer.getvalue(), maintype="application",
                           subtype="vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                           filename="見積書_2024.xlsx")
    return bytes(message)


def shipped_rules() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every example rule and client of gateway.toml, uncommented (as its test does)."""
    text = (ROOT / "gateway.toml").read_text(encoding="utf-8")
    examples = text.partition("## Client companies and rules.")[2].splitlines()[1:]
    config = tomllib.loads("\n".join(
        line[2:] if line.startswith("# ") else line
        for line in examples if not line.startswith("##")
    ))
    return config["rules"], config["clients"]


def relay_rules() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rules bench/compare.py runs the relay comparison with."""
    source = (ROOT / "bench" / "compare.py").read_text(encoding="utf-8")
    config = tomllib.loads(source.partition('RULES = """')[2].partition('"""')[0])
    return config["rules"], config["clients"]


def cpu_per_call(work: Callable[[], object], calls: int, repeats: int) -> tuple[float, float]:
    """Median and least, over `repeats` batches, of the CPU µs per call of `work` (the
    least is the figure least disturbed by other processes on a busy machine)."""
    work()  # warm up
    batches = []
    for _ in range(repeats):
        start = time.thread_time_ns()
        for _ in range(calls):
            work()
        batches.append((time.thread_time_ns() - start) / calls / 1000)
    return statistics.median(batches), min(batches)


def bookkeeping(result: Inspection) -> object:
    """What `Intake._submit` computes besides inspection for a stored message."""
    attachments = [intake._attachment_json(a) for a in result.attachments]
    return new_id(), result.verdict.model_dump(mode="json"), attachments


def run_case(label: str, raws: list[bytes], calls: int, repeats: int, policy: Policy) -> None:
    """Messages that differ as real ones do (subject, MIME boundary) are taken in turn, so
    that nothing a message reads is found cached only because it was read before."""
    result = inspect(raws[0], ENVELOPE, policy, NOW)
    print(f"{label}: {len(raws[0])} bytes, verdict {result.verdict.action.value} "
          f"({result.verdict.rule}), trace of {len(result.verdict.trace)} rules")
    turn = itertools.cycle(raws)
    whole = cpu_per_call(lambda: inspect(next(turn), ENVELOPE, policy, NOW), calls, repeats)
    parse_only = cpu_per_call(lambda: parse_message(next(turn)), calls, repeats)
    books = cpu_per_call(lambda: bookkeeping(result), calls * 10, repeats)
    show("inspect (parse+facts+rules)", whole)
    show("MIME parse (parse_message)", parse_only)
    show("intake bookkeeping", books)
    show("inspect + bookkeeping", (whole[0] + books[0], whole[1] + books[1]))


def show(label: str, figures: tuple[float, float]) -> None:
    print(f"  {label:<28} {figures[0]:9.1f} µs CPU/msg (least {figures[1]:.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rules", choices=("shipped", "relay", "bench"), default="shipped")
    parser.add_argument("--tree", type=Path, help="import the gateway from this checkout")
    parser.add_argument("--repeats", type=int, default=15, help="batches per figure")
    parser.add_argument("--calls", type=int, default=200, help="messages per batch")
    parser.add_argument("--skip-large", action="store_true", help="leave out the 5 MB case")
    args = parser.parse_args()
    load(args.tree or ROOT)
    rules, clients = {"shipped": shipped_rules, "relay": relay_rules,
                      "bench": lambda: (RULES, CLIENTS)}[args.rules]()
    policy = Policy.compile(rules, clients, ["corp.example"])
    print(f"code from {args.tree or ROOT}, {args.rules} rules ({len(policy.rules)})")
    distinct = range(args.calls + 1)  # more than a batch: every call reads a new message
    run_case("5 KB text mail", [text_mail(n) for n in distinct], args.calls, args.repeats, policy)
    run_case("text mail + small xlsx", [small_xlsx_mail(n) for n in distinct], args.calls,
             args.repeats, policy)
    if not args.skip_large:
        run_case("5 MB xlsx mail", [xlsx_mail()], 2, max(3, args.repeats // 3), policy)


if __name__ == "__main__":
    main()
