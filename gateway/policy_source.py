"""The rules in force, compiled once from config and swapped whole on reload."""

from __future__ import annotations

from gateway.config import Config
from policies.engine import Policy


def compile_policy(config: Config) -> Policy:
    return Policy(internal_domains=tuple(config.organization.domains))


class PolicySource:
    def __init__(self, config: Config) -> None:
        self._policy = compile_policy(config)

    def current(self) -> Policy:
        return self._policy

    def replace(self, config: Config) -> None:
        self._policy = compile_policy(config)


def lint_config(config: Config) -> list[str]:
    """Warnings that do not stop the gateway (e.g. an approver group nobody is in)."""
    return []


def render_inspection(result: object, *, as_json: bool) -> str:
    import json
    from dataclasses import asdict, is_dataclass
    verdict = getattr(result, "verdict")
    data = {
        "verdict": verdict.model_dump(mode="json"),
        "subject": getattr(result, "subject", None),
        "attachments": [asdict(a) if is_dataclass(a) else a for a in getattr(result, "attachments", ())],
    }
    if as_json:
        return json.dumps(data, ensure_ascii=False, indent=2, default=str)
    lines = [f"verdict: {verdict.action.value}" + (f" ({verdict.rule})" if verdict.rule else "")]
    lines += [f"attachment: {a['name']} {a['content_type']} {a['size']} bytes" for a in data["attachments"]]
    return "\n".join(lines)
