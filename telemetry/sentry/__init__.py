"""Sentry ingestion: envelopes read item by item (envelope.py), events in their stored
shape and grouped (events.py, grouping.py), transactions as spans (transactions.py),
and the worker's store loop (store.py). The protocol's door is
telemetry/receivers/sentry.py."""
