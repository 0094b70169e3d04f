"""Webhooks as the Standard Webhooks specification describes them.

A webhook's body is serialized once per event (the same bytes for every attempt and replay)
and signed per attempt with a fresh `webhook-timestamp` (`signing`). Every destination is checked
to be a public address, at registration and again at connection time (`guard`). `sender` makes
one attempt and says what its answer means; `endpoints` registers, enables and rotates them.
Which deliveries are due, and what an attempt's outcome does to them, is `worker.notify.outbox`'s
business.
"""
