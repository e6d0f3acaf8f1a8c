"""The service's one settings object: command-line flags beat the environment (`MELANOMA_TRIAGE_*`), which
beats a TOML file (`--settings FILE`), which beats the defaults. Checked once, at start: a weak token,
a shared database without a shared image folder or a session longer than a working day is refused
with the setting named.

>>> settings = Settings(bundle="bundle", tokens="dr-lee=" + "k" * 32)
>>> settings.image_store.as_posix(), settings.session_minutes
('runs/triage/images', 480)
>>> Settings(bundle="bundle", tokens="dr-lee=short")
Traceback (most recent call last):
errors.OptionError: token 'dr-lee': 5 characters; a token needs at least 24 (generate one: python -c "import secrets; print(secrets.token_urlsafe(32))").
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource
from sqlalchemy.engine import make_url

from errors import OptionError

ENV_PREFIX = "MELANOMA_TRIAGE_"
LABEL = re.compile(r"[A-Za-z0-9._-]{1,64}")  # a token's label: recorded in the audit columns (64 characters)
MIN_TOKEN_LENGTH = 24  # characters of a secret: guessing one at the sign-in throttle's rate takes longer than the universe
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_tokens(text: str | None) -> dict[str, str]:
    """`label=secret,other=secret2` (or a bare secret, labelled `default`) -> {secret: label}.

    >>> parse_tokens("dr-lee=abc,xyz")
    {'abc': 'dr-lee', 'xyz': 'default'}
    """
    tokens = {}
    for item in (part.strip() for part in (text or "").split(",")):
        if not item:
            continue
        label, equals, secret = item.partition("=")
        if not equals or not re.fullmatch(r"[A-Za-z0-9._-]+", label) or (secret and not secret.strip("=")):  # a bare secret (base64 padding too)
            label, secret = "default", item
        if not secret:
            raise OptionError(f"token {label}=: the secret is empty.")
        if not LABEL.fullmatch(label):
            raise OptionError(f"token {label[:20]}...=: a label has at most 64 characters.")
        tokens[secret] = label
    return tokens


class Settings(BaseSettings):
    """Everything the service is started with."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    bundle: Path = Field(description="An exported bundle (`export`); loaded once, checksums verified.")
    database: str = Field("sqlite:///runs/triage/triage.db", description="SQLAlchemy URL: sqlite:///FILE or postgresql+psycopg://... for several instances.")
    store: Path | None = Field(None, description="Folder of the uploaded images (default: beside the SQLite file; required for other databases).")
    tokens: str | None = Field(None, description="Access tokens, label=secret comma-separated; every call and page then needs one.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    session_minutes: int = Field(480, ge=1, le=24 * 60, description="A page session ends this long after sign-in.")
    idle_minutes: int = Field(30, ge=1, le=24 * 60, description="...or after this long without a request.")
    sign_in_attempts: int = Field(5, ge=1, le=100, description="Failed sign-ins per client and minute before 429.")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=64 * 64)
    max_files: int = Field(300, ge=1, le=2000, description="Images per request (a total-body exam in one upload).")
    max_request_bytes: int = Field(200 * 1024 * 1024, ge=1024)
    batch_size: int = Field(32, ge=1, le=1024)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource, env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource, file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)

    @field_validator("tokens")
    @classmethod
    def _strong_tokens(cls, text: str | None) -> str | None:
        for secret, label in parse_tokens(text).items():
            if len(secret) < MIN_TOKEN_LENGTH:
                raise OptionError(
                    f"token {label!r}: {len(secret)} characters; a token needs at least {MIN_TOKEN_LENGTH} "
                    '(generate one: python -c "import secrets; print(secrets.token_urlsafe(32))").'
                )
        return text

    @property
    def token_labels(self) -> dict[str, str]:
        """{secret: label} of every access token."""
        return parse_tokens(self.tokens)

    @property
    def image_store(self) -> Path:
        """The image folder: the one given, or beside a SQLite file (other databases are shared by several
        instances, which must share one folder too)."""
        if self.store is not None:
            return self.store
        parsed = make_url(self.database)
        if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
            raise OptionError(f"--database {self.database.split('@')[-1]}: not a SQLite file, so give --store DIR for the uploaded images (shared by every instance).")
        return Path(parsed.database).parent / "images"

    @classmethod
    def load(cls, *, file: Path | None = None, **flags: Any) -> Settings:
        """The settings from flags (None: not given), the environment and `file` (TOML), checked; a
        user's mistake is an `OptionError` naming the setting."""
        if file is not None and not Path(file).is_file():
            raise OptionError(f"--settings {file}: no such file.")
        source = cls if file is None else type("FileSettings", (cls,), {"model_config": {**cls.model_config, "toml_file": Path(file)}})
        try:
            settings = source(**{name: value for name, value in flags.items() if value is not None})
        except ValidationError as error:
            raise OptionError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors())) from None
        settings.image_store  # noqa: B018 (checked at start, not at the first upload)
        return settings
