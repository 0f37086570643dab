"""Message and recipient states, and the one table of transitions between them."""

from __future__ import annotations

from enum import StrEnum


class MessageState(StrEnum):
    QUEUED = "queued"  # released to delivery
    HELD = "held"  # waiting for an approver
    DELAYED = "delayed"  # waiting for its send window to end, cancellable by the sender
    DELIVERED = "delivered"  # every recipient finished, at least one delivered
    BOUNCED = "bounced"  # every recipient finished, none delivered
    REJECTED = "rejected"  # an approver said no
    CANCELLED = "cancelled"  # the sender took it back during the delay
    EXPIRED = "expired"  # nobody decided in time


class RecipientState(StrEnum):
    WAITING = "waiting"  # the message is held or delayed
    QUEUED = "queued"  # due for its first attempt
    DEFERRED = "deferred"  # a temporary failure; retried at next_attempt_at
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    CANCELLED = "cancelled"


class InvalidTransition(Exception):
    def __init__(self, kind: str, current: str, target: str) -> None:
        super().__init__(f"{kind} cannot go from {current} to {target}")
        self.current = current
        self.target = target


M, R = MessageState, RecipientState

MESSAGE_TRANSITIONS: dict[MessageState, frozenset[MessageState]] = {
    # queued → held: delivery found it cannot apply a transform its rules ask for
    M.QUEUED: frozenset({M.DELIVERED, M.BOUNCED, M.HELD}),
    M.HELD: frozenset({M.QUEUED, M.REJECTED, M.EXPIRED}),
    M.DELAYED: frozenset({M.QUEUED, M.CANCELLED, M.HELD}),
    M.DELIVERED: frozenset(),
    M.BOUNCED: frozenset(),
    M.REJECTED: frozenset(),
    M.CANCELLED: frozenset(),
    M.EXPIRED: frozenset(),
}

RECIPIENT_TRANSITIONS: dict[RecipientState, frozenset[RecipientState]] = {
    R.WAITING: frozenset({R.QUEUED, R.CANCELLED}),
    R.QUEUED: frozenset({R.DELIVERED, R.DEFERRED, R.BOUNCED, R.WAITING}),
    R.DEFERRED: frozenset({R.DELIVERED, R.DEFERRED, R.BOUNCED, R.WAITING}),
    R.DELIVERED: frozenset(),
    R.BOUNCED: frozenset(),
    R.CANCELLED: frozenset(),
}

FINAL_RECIPIENT_STATES = frozenset(s for s, nxt in RECIPIENT_TRANSITIONS.items() if not nxt)
DUE_RECIPIENT_STATES = frozenset({R.QUEUED, R.DEFERRED})


def check_message(current: MessageState, target: MessageState) -> MessageState:
    if target not in MESSAGE_TRANSITIONS[current]:
        raise InvalidTransition("message", current, target)
    return target


def check_recipient(current: RecipientState, target: RecipientState) -> RecipientState:
    if target not in RECIPIENT_TRANSITIONS[current]:
        raise InvalidTransition("recipient", current, target)
    return target
