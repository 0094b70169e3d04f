"""Telling merchants: the outbox, signed webhooks and email."""
