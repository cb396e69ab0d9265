"""Suite-wide settings: every Hypothesis test draws the same examples on every run.

Tests that give their own `@settings(...)` inherit these unless they override them; no example
database is kept, so a run does not depend on what an earlier run stored.
"""

from hypothesis import settings

settings.register_profile("tape", derandomize=True, database=None)
settings.load_profile("tape")
