"""The carrier's quota: the pace line and the limiter that grants lookups."""
