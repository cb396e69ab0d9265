"""Suite-wide settings: every Hypothesis test draws the same examples on every run.

Tests that give their own `@settings(...)` inherit these unless they override them; no example
database is kept, so a run does not depend on what an earlier run stored.
"""

import os

import pytest
from hypothesis import settings

from tape.trace_cache import CACHE_DIR_ENV

settings.register_profile("tape", derandomize=True, database=None)
settings.load_profile("tape")


@pytest.fixture(autouse=True, scope="session")
def _private_trace_cache(tmp_path_factory):
    """Every test (and every `tape` process a test starts) caches parsed traces in a folder of
    the test session's, never in the user's cache folder."""
    previous = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(tmp_path_factory.mktemp("trace-cache"))
    yield
    if previous is None:
        os.environ.pop(CACHE_DIR_ENV, None)
    else:
        os.environ[CACHE_DIR_ENV] = previous


@pytest.fixture(autouse=True)
def _isolation_warning_given(monkeypatch):
    """Where bwrap cannot run, the first command that runs a program warns once (one line) of
    partial isolation; tests/test_cli_sandbox.py tests that warning. Elsewhere it would land in
    the output of whichever test ran a program first."""
    import tape.isolation

    monkeypatch.setattr(tape.isolation, "_warned", True)
