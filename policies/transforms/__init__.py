"""Pure `bytes -> bytes` transforms applied at delivery: ZIP encryption and Bcc rewriting."""
