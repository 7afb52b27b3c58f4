"""Garbage-collector settings for a process that holds many long-lived connections.

A full (generation 2) collection walks every tracked object and stops the event loop
while it does: measured here at 28 ms with 1,000 WebSocket connections and 64-102 ms with
5,000, and a 56 ms stall inside a fan-out latency run (docs/PERFORMANCE.md). With CPython's
defaults (700, 10, 10) a fan-out's short-lived lists trigger one every few seconds once the
old generation has grown. So `realtime serve`, once started:

- freezes what start-up made (modules, config, listeners: never garbage), so that no
  collection walks it again;
- makes full collections rarer: at most one per 100 generation-1 collections, which is
  about 4 million container allocations (minutes of fan-out), not 70,000. Young collections
  stay small (2,000 objects), so each one stays well under a millisecond.

The cost: a closed connection's objects form reference cycles (session and transport point
at each other), and once old they wait for the next full collection to be freed, so after
heavy churn memory comes back later than with the defaults, not never.
"""

from __future__ import annotations

import gc

THRESHOLDS = (2000, 20, 100)


def tune_for_long_lived_connections() -> None:
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
