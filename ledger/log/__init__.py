"""The append-only event log: appending (recorder), reading (reader) and quarantine."""
