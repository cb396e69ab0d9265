"""Before `tape evolve` starts: is the LLM endpoint there at all?

OpenEvolve treats a failed LLM call as one failed iteration and goes on, so a wrong --api-base
would otherwise cost the whole run (hours at the default 1000 iterations) before anything says
so. `check_endpoint` sends one short request, `GET {api_base}/models` with the API key. An
endpoint that cannot be reached (connection refused, unknown host, no answer in time, not HTTP)
is an error; an HTTP error status is not (some OpenAI-compatible servers have no /models), but
401 and 403 come back as a warning about the key.
"""

from __future__ import annotations

import http.client
import socket
import urllib.error
import urllib.request
from urllib.parse import urlparse

from tape.errors import ConfigError

__all__ = ["PREFLIGHT_TIMEOUT_S", "check_endpoint"]

PREFLIGHT_TIMEOUT_S = 5.0
"""Seconds the endpoint has to answer the preflight request."""


def _reason(error: BaseException, timeout_s: float) -> str:
    """A short reason for a failed connection: "Connection refused", "no answer within 5 s"."""
    if isinstance(error, urllib.error.URLError) and isinstance(error.reason, BaseException):
        error = error.reason
    if isinstance(error, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout_s:g} s"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error.reason if isinstance(error, urllib.error.URLError) else error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def check_endpoint(api_base: str, api_key: str | None, *, key_variable: str,
                   timeout_s: float = PREFLIGHT_TIMEOUT_S) -> str | None:
    """Send `GET {api_base}/models` once; raise if nothing answers, else return a warning or None.

    Args:
        api_base: the OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.
        api_key: sent as a bearer token (None: no Authorization header).
        key_variable: the environment variable the key came from, for the 401/403 warning.
        timeout_s: seconds to wait for the connection and for the answer.

    Returns:
        A one-line warning when the endpoint refused the key (401, 403) or answered with another
        error status than 404 (a server without /models), else None.

    Raises:
        ConfigError: `api_base` is not an http(s) URL, or the endpoint cannot be reached.
    """
    parsed = urlparse(api_base)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(
            f"LLM endpoint {api_base!r} is not an http(s) URL; give --api-base like "
            "http://localhost:8000/v1"
        )
    url = api_base.rstrip("/") + "/models"
    request = urllib.request.Request(url, method="GET")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return None
    except urllib.error.HTTPError as error:  # the server answered: it is there
        status = error.code
        error.close()
        if status in (401, 403):
            return (f"the LLM endpoint {api_base} refused the API key (HTTP {status} for GET "
                    f"{url}); check {key_variable} (or --api-key-env) if the run's requests fail")
        if status == 404:  # no /models route: common, and says nothing about chat completions
            return None
        return f"the LLM endpoint {api_base} answered HTTP {status} to GET {url}; starting anyway"
    except (OSError, http.client.HTTPException, ValueError) as error:
        raise ConfigError(
            f"cannot reach the LLM endpoint {api_base}: {_reason(error, timeout_s)} (GET {url}); check "
            "--api-base (or llm.api_base in the config) and that the server is running"
        ) from None
