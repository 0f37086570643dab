"""The Sekisho process: config, CLI, SMTP in, intake, delivery, HTTP API and audit."""
