"""Alerts (docs/alerts.md), in the order a message takes:

- `conditions`: one function per condition, reading the cheap tables (per-minute
  counts, runs, error groups, the spool's pending index) for what is true now;
- `evaluation`: the round beat runs every 30 s: rules, their per-subject states,
  cooldowns, one message per rule and round, "resolved" when a state clears;
- `messages`: what a message says (the generic webhook payload);
- `delivery`: one message to one channel (webhook, Slack, Discord, email), with its
  outcome kept on the channel;
- `rules_file`: `manage.py alerts import/export` (SPEC §7a).
"""
