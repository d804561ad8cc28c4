"""Sentry compatibility: the package reads Sentry envelopes and events.

`events` turns one Sentry event (an envelope's `event` item or a `/store/` body) into
the canonical stored event and an error occurrence; `grouping` decides which group
it joins (docs/errors.md, "Sentry grouping").
"""
