"""The hub: channels, subscriptions, fan-out, sessions, positions. Knows no socket, no Redis."""
