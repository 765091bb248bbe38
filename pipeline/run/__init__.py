"""The main process of a run: pre-start checks, the supervisor, the ledger, telemetry and progress, updates."""
