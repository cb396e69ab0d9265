"""Before `tape evolve` starts: can the LLM endpoint be reached at all?

OpenEvolve treats a failed LLM call as one failed iteration and goes on, so a wrong --api-base
would otherwise cost the whole run (hours at the default 1000 iterations) before anything says
so. `check_endpoint` lists the endpoint's models once (`GET {api_base}/models`) with the client
the run itself uses, `openai.OpenAI` without retries, so that proxies, certificates and
redirects behave as they will in the run (a redirect to another host does not carry the key).

Only an endpoint that cannot be connected to is an error: connection refused, unknown host, an
unreachable network, a TLS handshake or certificate that fails, or an api_base that is not a
valid http(s) URL. An endpoint that accepts the connection but answers slowly, or answers with
an HTTP error status (some OpenAI-compatible servers have no /models), is at most a warning:
401 and 403 about the key, 404 with a hint when `{api_base}/v1/models` answers instead. The API
key never appears in a message.
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Iterator
from urllib.parse import urlparse

from tape.errors import ConfigError

__all__ = ["PREFLIGHT_TIMEOUT_S", "check_endpoint"]

PREFLIGHT_TIMEOUT_S = 5.0
"""Seconds the endpoint has to accept the connection, and again to answer the request."""

_NO_KEY = "no-key-given"
"""Sent when the caller has no key (the OpenAI client insists on one)."""

_HINT = "check --api-base (or llm.api_base in the config)"


def _invalid_url(api_base: str, error: Exception) -> ConfigError:
    return ConfigError(f"LLM endpoint {api_base!r} is not a valid URL ({error}); give "
                       "--api-base like http://localhost:8000/v1")


def _check_url(api_base: str) -> str:
    """The host of `api_base`; ConfigError unless it is an http(s) URL with a host."""
    try:
        parsed = urlparse(api_base)
        parsed.port  # noqa: B018 -- raises ValueError for a port that is not a number 0-65535
    except ValueError as error:
        raise _invalid_url(api_base, error) from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(
            f"LLM endpoint {api_base!r} is not an http(s) URL; give --api-base like "
            "http://localhost:8000/v1"
        )
    return parsed.hostname


def _causes(error: BaseException) -> Iterator[BaseException]:
    """`error` and the exceptions it was raised from, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _connection_failure(error: BaseException, host: str) -> tuple[str, str] | None:
    """(reason, what to do) when no connection could be made at all, else None (the connection
    was made and the exchange failed afterwards)."""
    for cause in _causes(error):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (
                f"its TLS certificate cannot be verified ({cause.verify_message or cause.reason})",
                ("this is a certificate problem, not a connection one, and the run's LLM client "
                 "checks certificates the same way: give Python the CA that signed the server's "
                 "certificate (SSL_CERT_FILE=/path/to/ca.pem)"),
            )
        if isinstance(cause, ssl.SSLError):
            return (f"the TLS handshake failed ({cause.reason or cause})",
                    f"{_HINT}: http:// or https:// as the server speaks")
        if isinstance(cause, socket.gaierror):
            return (f"unknown host {host!r} ({cause.strerror or cause})",
                    f"{_HINT} and its host name")
        if isinstance(cause, ConnectionRefusedError) or (
                isinstance(cause, OSError) and cause.errno in (errno.ENETUNREACH,
                                                               errno.EHOSTUNREACH)):
            return (cause.strerror or type(cause).__name__,
                    f"{_HINT} and that the server is running")
    return None


def _list_models(api_base: str, api_key: str, timeout_s: float) -> BaseException | None:
    """The error of `GET {api_base}/models` through the OpenAI client, or None if it worked."""
    import openai

    try:
        client = openai.OpenAI(base_url=api_base, api_key=api_key, max_retries=0,
                               timeout=timeout_s)
    except openai.OpenAIError as error:
        return error
    except Exception as error:  # noqa: BLE001 - no I/O yet: its URL parser refused api_base
        raise _invalid_url(api_base, error) from None
    try:
        client.models.list()
    except Exception as error:  # noqa: BLE001 - a server may answer in any way; classified
        return error
    finally:
        client.close()
    return None


def check_endpoint(api_base: str, api_key: str | None, *, key_variable: str,
                   timeout_s: float = PREFLIGHT_TIMEOUT_S) -> str | None:
    """List the endpoint's models once; raise if no connection can be made, else return a
    warning or None.

    Args:
        api_base: the OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.
        api_key: the key the run sends (None: a placeholder). Never put into a message.
        key_variable: the environment variable the key came from, for the 401/403 warning.
        timeout_s: seconds to connect, and again to get the answer.

    Returns:
        A one-line warning when the endpoint gave no answer in time, refused the key (401,
        403), answered 404 where `{api_base}/v1/models` answers (a missing /v1), or answered
        with another error status than 404; else None.

    Raises:
        ConfigError: `api_base` is not a valid http(s) URL, or no connection can be made (the
            message says why: refused, unknown host, TLS certificate, ...).
    """
    import openai

    host = _check_url(api_base)
    url = api_base.rstrip("/") + "/models"
    key = api_key or _NO_KEY
    error = _list_models(api_base, key, timeout_s)
    if error is None:
        return None
    if isinstance(error, openai.APIStatusError):
        return _status_warning(error.status_code, api_base, url, key, key_variable, timeout_s)
    if isinstance(error, openai.APITimeoutError):  # connected or not, it may just be slow
        return (f"no answer from the LLM endpoint {api_base} within {timeout_s:g} s (GET {url}); "
                "starting anyway: if the run's requests fail, check the server and --api-base")
    if isinstance(error, openai.APIConnectionError):
        failure = _connection_failure(error, host)
        if failure is not None:
            reason, advice = failure
            raise ConfigError(f"cannot reach the LLM endpoint {api_base}: {reason} (GET {url}); "
                              f"{advice}")
    # Connected, then the exchange failed: name the kind only (a message might hold the key).
    innermost = list(_causes(error))[-1]
    return (f"the LLM endpoint {api_base} gave no usable answer to GET {url} "
            f"({type(innermost).__name__}); starting anyway")


def _status_warning(status: int, api_base: str, url: str, key: str, key_variable: str,
                    timeout_s: float) -> str | None:
    """The warning for an HTTP error status of `GET {api_base}/models` (None for a plain 404:
    a server without that route)."""
    if status in (401, 403):
        return (f"the LLM endpoint {api_base} refused the API key (HTTP {status} for GET "
                f"{url}); check {key_variable} (or --api-key-env) if the run's requests fail")
    if status != 404:
        return f"the LLM endpoint {api_base} answered HTTP {status} to GET {url}; starting anyway"
    base = api_base.rstrip("/")
    if base.endswith("/v1"):
        return None
    retry = _list_models(base + "/v1", key, timeout_s)  # vLLM and ollama serve under /v1
    if retry is None or getattr(retry, "status_code", None) in (401, 403):
        return (f"the LLM endpoint {api_base} answered HTTP 404 to GET {url}, but "
                f"{base}/v1/models answered: did you mean --api-base {base}/v1? Starting anyway")
    return None
