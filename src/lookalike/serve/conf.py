"""Settings of ``lookalike serve``, and where its API key comes from.

Closed by default: the service binds to 127.0.0.1, every write needs the API key (and
every read too with ``auth="all"``), and with no key configured writes are refused unless
``no_auth`` says so explicitly. The key comes from the environment variable
``LOOKALIKE_API_KEY`` or a file (``--api-key-file``), never from the command line, where
``ps`` would show it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lookalike.errors import ConfigError

API_KEY_ENV = "LOOKALIKE_API_KEY"
AUTH_MODES = ("writes", "all")  # what needs the key: writes only, or every request
MIN_KEY_LENGTH = 16  # characters: a shorter key is refused (guessable)


def default_active() -> int:
    """Requests at work at once by default: two per core (2..32). One per core leaves the
    cores idle while a request decodes its upload or waits on Python: on 2 cores, 16 clients
    got 90% of the in-process throughput with 2 slots, 97% with 4 (benchmarks/serve.py)."""
    return min(32, max(2, 2 * (os.cpu_count() or 1)))


@dataclass(frozen=True)
class ServeConf:
    """How the service runs and what it accepts."""

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    auth: str = "writes"  # AUTH_MODES: what needs the API key
    api_key: str | None = None  # None: no key configured (writes refused unless no_auth)
    no_auth: bool = False  # serve writes without a key (explicitly asked for)
    max_upload_mb: float = 20.0  # an upload larger than this is refused while it streams
    max_active: int = field(default_factory=default_active)  # requests at work at once
    max_queued: int = 16  # requests waiting for a slot; past them: 503 with Retry-After
    cors: tuple[str, ...] = ()  # origins allowed cross-origin requests; () is off
    k_max: int = 1000  # the largest k a request may ask for

    def __post_init__(self) -> None:
        if self.auth not in AUTH_MODES:
            raise ConfigError(f"auth must be one of {', '.join(AUTH_MODES)}, got {self.auth!r}")
        if not (isinstance(self.port, int) and 0 <= self.port < 65536):
            raise ConfigError(f"port must be in 0..65535, got {self.port!r}")
        if not self.max_upload_mb > 0:
            raise ConfigError(f"max_upload_mb must be positive, got {self.max_upload_mb!r}")
        for name in ("max_active", "k_max"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (isinstance(self.max_queued, int) and self.max_queued >= 0):
            raise ConfigError(f"max_queued must be >= 0, got {self.max_queued!r}")
        if self.api_key is not None and len(self.api_key) < MIN_KEY_LENGTH:
            raise ConfigError(f"the API key must have at least {MIN_KEY_LENGTH} characters")
        if self.auth == "all" and self.api_key is None and not self.no_auth:
            raise ConfigError(
                f"--auth all needs an API key: set {API_KEY_ENV} or give --api-key-file"
            )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def writes_open(self) -> bool:
        """Whether writes are served at all (a key is configured, or no_auth)."""
        return self.api_key is not None or self.no_auth


def load_api_key(key_file: str | Path | None = None) -> str | None:
    """The API key: the first line of ``key_file``, else ``$LOOKALIKE_API_KEY``, else None.

    Raises:
        ConfigError: the file cannot be read or is empty.
    """
    if key_file is not None:
        try:
            text = Path(key_file).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read the API key file {key_file}: {error}") from None
        key = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not key:
            raise ConfigError(f"the API key file {key_file} is empty")
        return key
    key = os.environ.get(API_KEY_ENV, "").strip()
    return key or None
