"""The durable store: models, the state machine, the repository and migrations."""
