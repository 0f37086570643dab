"""Sample clients and the rules of the shipped example, shared by the policy tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

NOW = datetime(2024, 1, 15, 10, 0, tzinfo=UTC)

CLIENTS: list[dict[str, Any]] = [
    {"name": "acme", "domains": ["acme.example", "*.acme.example"], "markers": ["ACME", "アクメ"]},
    {"name": "beta", "domains": ["beta.example"], "markers": ["BETA", "ベータ商事"],
     "zip_password": "beta-pass", "zip_method": "zipcrypto"},
]

ISSUE_RULES: list[dict[str, Any]] = [
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
]
