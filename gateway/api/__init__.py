"""The /api/v1 routers: messages and their decisions, and the audit log."""
