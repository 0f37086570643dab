"""The one config object, parsed once from gateway.toml by pydantic and passed down.

Relative paths in the file (the SQLite database, the maildir, the audit log, TLS
files, `file:` secrets) are resolved against the directory of the config file, so
`sekisho serve --config /etc/sekisho/gateway.toml` means the same wherever it is run.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from policies.config import ClientSpec, RuleSpec, check_unique
from policies.units import parse_duration, parse_size

Size = Annotated[int, BeforeValidator(parse_size)]
Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def _longer_than_zero(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be longer than 0s")
    return value


# A wait or period of zero would make its loop spin (a lease renewed, a poll, a retry
# at once, again and again): refused where the config is read.
PositiveDuration = Annotated[Duration, AfterValidator(_longer_than_zero)]


class ConfigError(Exception):
    """The config cannot be used; `problems` are `key.path: reason` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def resolve_secret(value: object, base: Path | None = None) -> object:
    """`env:NAME` reads the environment, `file:PATH` reads a file; anything else is literal."""
    if not isinstance(value, str):
        return value
    if value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set")
        return os.environ[name]
    if value.startswith("file:"):
        path = _under(base, value[5:])
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as error:
            raise ValueError(f"cannot read secret file {path}: {error.strerror}") from None
    return value


def _under(base: Path | None, path: str) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() or base is None else base / candidate


def _base(info: ValidationInfo) -> Path | None:
    return info.context.get("base") if isinstance(info.context, dict) else None


def _secret(value: object, info: ValidationInfo) -> object:
    return resolve_secret(value, _base(info))


Secret = Annotated[SecretStr, BeforeValidator(_secret)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(value: object) -> Endpoint:
    if isinstance(value, Endpoint):
        return value
    if not isinstance(value, str):
        raise ValueError("expected 'host:port'")
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected 'host:port', got {value!r}")
    return Endpoint(host.strip("[]") or "0.0.0.0", int(port))


EndpointField = Annotated[Endpoint, BeforeValidator(parse_endpoint)]


class AuthMode(StrEnum):
    REQUIRED = "required"  # every client must AUTH
    OPTIONAL = "optional"  # AUTH offered; trusted_networks may relay without it
    OFF = "off"  # no AUTH; only trusted_networks may relay


class BareNewline(StrEnum):
    NORMALIZE = "normalize"
    REJECT = "reject"


class SmtpConfig(_Section):
    listen: EndpointField = Endpoint("127.0.0.1", 10025)
    hostname: str = "sekisho.localdomain"
    max_message_size: Size = 50 * 1024 * 1024
    max_recipients: int = Field(default=100, ge=1, le=100_000)
    max_connections: int = Field(default=500, ge=1)
    max_errors: int = Field(default=20, ge=1)
    idle_timeout: PositiveDuration = timedelta(minutes=5)  # RFC 5321 §4.5.3.2.7
    auth: AuthMode = AuthMode.OPTIONAL
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    require_tls: bool = False
    bare_newline: BareNewline = BareNewline.NORMALIZE

    @field_validator("trusted_networks", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        if not isinstance(value, list | tuple):
            raise ValueError("expected a list of networks like ['127.0.0.1/32', '10.0.0.0/8']")
        return tuple(ipaddress.ip_network(str(v), strict=False) for v in value)

    @field_validator("tls_cert", "tls_key", mode="before")
    @classmethod
    def _paths(cls, value: object, info: ValidationInfo) -> object:
        if value in (None, ""):
            return None
        return _under(_base(info), str(value))

    @model_validator(mode="after")
    def _tls_pair(self) -> SmtpConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.require_tls and self.tls_cert is None:
            raise ValueError("require_tls needs tls_cert and tls_key")
        return self


class StartTls(StrEnum):
    REQUIRED = "required"
    OPPORTUNISTIC = "opportunistic"
    OFF = "off"


@dataclass(frozen=True, slots=True)
class Upstream:
    scheme: Literal["smtp", "smtps", "maildir"]
    host: str = ""
    port: int = 0
    path: Path | None = None

    def __str__(self) -> str:
        return (
            f"maildir:{self.path}"
            if self.scheme == "maildir"
            else f"{self.scheme}://{self.host}:{self.port}"
        )


def parse_upstream(value: object, info: ValidationInfo) -> Upstream:
    if isinstance(value, Upstream):
        return value
    if not isinstance(value, str):
        raise ValueError("expected 'smtp://host:port', 'smtps://host:port' or 'maildir:PATH'")
    if value.startswith("maildir:"):
        path = value.removeprefix("maildir:").removeprefix("//")
        if not path:
            raise ValueError("maildir: needs a path, e.g. 'maildir:var/outbox'")
        return Upstream("maildir", path=_under(_base(info), path))
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("smtp", "smtps"):
        raise ValueError(
            f"unknown scheme {scheme if sep else value!r}; use smtp://, smtps:// or maildir:"
        )
    default_port = 465 if scheme == "smtps" else 25
    endpoint = parse_endpoint(
        rest.rstrip("/")
        if ":" in rest.lstrip("[").split("]")[-1]
        else f"{rest.rstrip('/')}:{default_port}"
    )
    return Upstream(scheme, endpoint.host, endpoint.port)  # type: ignore[arg-type]


class DeliveryConfig(_Section):
    upstream: Annotated[Upstream, BeforeValidator(parse_upstream)] = Upstream(
        "maildir", path=Path("var/outbox")
    )
    starttls: StartTls = StartTls.OPPORTUNISTIC
    username: str | None = None
    password: Secret | None = None
    helo_name: str | None = None
    # Postfix's default_destination_concurrency_limit is 20: so many transactions to
    # one smarthost at once. Fewer leave delivery waiting on round trips, not CPU
    # (bench/relay.py --workers 4 vs 20: README, Performance).
    workers: int = Field(default=20, ge=1, le=256)
    connections: int = Field(default=20, ge=1, le=256)
    pipelining: bool = True
    idle_close: PositiveDuration = timedelta(seconds=10)
    timeout: PositiveDuration = timedelta(seconds=60)
    retry_initial: PositiveDuration = timedelta(minutes=1)
    retry_max: Duration = timedelta(hours=1)
    bounce_after: Duration = timedelta(days=5)
    lease: PositiveDuration = timedelta(minutes=5)
    poll_interval: PositiveDuration = timedelta(seconds=1)
    verify_certificate: bool = True

    @model_validator(mode="after")
    def _credentials(self) -> DeliveryConfig:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together: set both or neither")
        if (
            self.username is not None
            and self.upstream.scheme == "smtp"
            and self.starttls is not StartTls.REQUIRED
        ):
            # Opportunistic STARTTLS can be stripped by a man in the middle, who would
            # then read the password in the AUTH command.
            raise ValueError(
                'credentials over smtp:// need starttls = "required" (or use smtps://)'
            )
        if self.retry_initial > self.retry_max:
            raise ValueError("retry_initial is longer than retry_max")
        return self


class StoreConfig(_Section):
    url: str = "sqlite:///var/sekisho.db"
    keep_bodies: Duration | None = None
    pool_size: int = Field(default=10, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str, info: ValidationInfo) -> str:
        scheme = value.split(":", 1)[0].split("+", 1)[0]
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError(
                f"unsupported database {scheme!r}; use sqlite:///PATH or postgresql://…"
            )
        prefix = "sqlite:///"
        if value.startswith(prefix) or value.startswith("sqlite+aiosqlite:///"):
            path = value.split(":///", 1)[1]
            if path and path != ":memory:" and not path.startswith("/"):
                base = _base(info)
                return f"sqlite:///{_under(base, path)}"
        return value


class AdminConfig(_Section):
    listen: EndpointField | None = Endpoint("127.0.0.1", 8025)
    public_url: str = "http://127.0.0.1:8025"


class AuditConfig(_Section):
    path: str = "var/audit.log"  # may contain {instance}: one file per instance
    instance: str | None = None  # this writer's chain; default "<hostname>:<smtp port>"

    @field_validator("path")
    @classmethod
    def _path(cls, value: str, info: ValidationInfo) -> str:
        return value if value == "-" else str(_under(_base(info), value))


class OrganizationConfig(_Section):
    domains: tuple[str, ...] = ()
    name: str = ""


class OnExpire(StrEnum):
    REJECT = "reject"
    RELEASE = "release"


class ApprovalConfig(_Section):
    default_approvers: tuple[str, ...] = ("group:approvers",)
    remind_after: Duration | None = timedelta(hours=4)
    escalate_after: Duration | None = None
    escalate_to: tuple[str, ...] = ()
    expire_after: Duration = timedelta(days=3)
    on_expire: OnExpire = OnExpire.REJECT
    notify_by_mail: bool = True  # mail approvers about held mail, and senders about decisions


class EncryptionConfig(_Section):
    method: Literal["aes256", "zipcrypto"] = "aes256"
    mode: Literal["per_file", "bundle"] = "per_file"
    notify: Literal["sender", "recipients_later", "none"] = "sender"
    notify_delay: Duration = timedelta(minutes=10)
    header: bool = True


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    smtp: SmtpConfig = SmtpConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    store: StoreConfig = StoreConfig()
    admin: AdminConfig = AdminConfig()
    audit: AuditConfig = AuditConfig()
    organization: OrganizationConfig = OrganizationConfig()
    approval: ApprovalConfig = ApprovalConfig()
    encryption: EncryptionConfig = EncryptionConfig()
    templates: dict[str, str] = Field(default_factory=dict)
    clients: tuple[ClientSpec, ...] = ()
    rules: tuple[RuleSpec, ...] = ()
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("clients", mode="before")
    @classmethod
    def _client_secrets(cls, value: object, info: ValidationInfo) -> object:
        # policies/ does no I/O, so `env:`/`file:` ZIP passwords are resolved here.
        if not isinstance(value, list | tuple):
            return value
        return [
            {**c, "zip_password": resolve_secret(c["zip_password"], _base(info))}
            if isinstance(c, dict) and "zip_password" in c
            else c
            for c in value
        ]

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        check_unique((r.name for r in self.rules), "rule")
        check_unique((c.name for c in self.clients), "client")
        return self


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; every problem is reported with its key path."""
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{file}: no such file"]) from None
    except OSError as error:
        raise ConfigError([f"{file}: {error.strerror}"]) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"{file}: not valid TOML: {error}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{file}: not UTF-8 text"]) from None
    return parse_config(data, base=file.resolve().parent, source=file)


def parse_config(
    data: Mapping[str, Any], base: Path | None = None, source: Path | None = None
) -> Config:
    try:
        config = Config.model_validate(dict(data), context={"base": base})
    except ValidationError as error:
        raise ConfigError(format_errors(error, Config)) from None
    return config.model_copy(update={"source": source})


def format_errors(error: ValidationError, model: type[BaseModel]) -> list[str]:
    problems = []
    for item in error.errors(include_url=False):
        loc = item["loc"]
        path = _dotted(loc)
        message = str(item["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key" + _did_you_mean(model, loc)
        problems.append(f"{path}: {message}" if path else message)
    return problems


def _dotted(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif str(part).startswith("function-") or str(part) in ("tagged-union",):
            continue
        else:
            text += f".{part}" if text else str(part)
    return text


def _did_you_mean(model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    fields = _fields_at(model, loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
        current = (
            getattr(current, "__args__", (current,))[0]
            if not isinstance(current, type)
            else current
        )
    return list(getattr(current, "model_fields", {}))
