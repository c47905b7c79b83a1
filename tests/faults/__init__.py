"""The fault suite: real services broken the way operators break them (see docs/faults.md)."""
