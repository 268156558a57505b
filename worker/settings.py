"""One typed settings object for the service, read from ``CCFNET_*`` environment variables (and ``.env``).

Built once at the process edge with :func:`get_settings` and passed down; nothing reads the environment at
import time. A bad value stops start-up with :class:`SettingsError`, whose message names the variable. A path
setting that is set but empty (``CCFNET_SPOOL_DIR=``) counts as unset and takes its default.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "CCFNET_"

# DICOM AE titles: 1-16 characters of the default character repertoire, no backslash, not all spaces.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

QueueName = Literal["inference", "export", "batch"]


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the environment variable."""


def _check_ae_title(value: str, what: str) -> str:
    value = value.strip()
    if not _AE_TITLE.match(value) or not value:
        raise ValueError(f"{what} must be 1-16 printable characters without a backslash, got {value!r}")
    return value


def _blank_as_unset(value: Any) -> Any:
    """An empty (or all-space) path value counts as unset: read as a path it would be ".", the current folder."""
    return None if isinstance(value, str) and not value.strip() else value


# A path setting that may be left out; set but empty is the same as left out (None: the documented default).
OptionalPath = Annotated[Path | None, BeforeValidator(_blank_as_unset)]
DEFAULT_DATA_DIR = Path("var")


def _split_list(value: Any) -> Any:
    """Accept a comma-separated string or a JSON list for list-valued variables."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class DicomDestination(BaseModel):
    """A DICOM C-STORE SCP that receives our result objects."""

    kind: Literal["dicom"] = "dicom"
    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = None
    tls: bool = False  # DICOM TLS (PS3.15 B.1): the peer's certificate is verified against tls_ca
    tls_ca: OptionalPath = None  # unset: the system's trusted CAs
    tls_cert: OptionalPath = None  # our client certificate, for a peer that asks for one
    tls_key: OptionalPath = None

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value, "ae_title")

    @model_validator(mode="after")
    def _tls_pair(self) -> DicomDestination:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        return self


class DicomWebDestination(BaseModel):
    """A DICOMweb STOW-RS endpoint that receives our result objects."""

    kind: Literal["dicomweb"] = "dicomweb"
    name: str
    url: str
    username: str | None = None
    password: SecretStr | None = None  # HTTP basic, with username
    token: SecretStr | None = None  # HTTP bearer
    tls_ca: OptionalPath = None  # for https: unset means the system's trusted CAs

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_auth(self) -> DicomWebDestination:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password must be set together")
        if self.token is not None and self.username is not None:
            raise ValueError("give either a bearer token or a username and password, not both")
        return self


Destination = Annotated[DicomDestination | DicomWebDestination, Field(discriminator="kind")]


class Settings(BaseSettings):
    """Everything the service can be told. Field ``x`` is the variable ``CCFNET_X``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    # DICOM listener
    ae_title: str = "CCFNET"
    port: int = Field(default=11112, ge=0, le=65535)
    bind_address: str = "0.0.0.0"
    allowed_calling_aets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    allowed_peer_addresses: Annotated[list[IpNetwork], NoDecode] = Field(default_factory=list)
    extra_storage_sop_classes: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_associations: int = Field(default=16, ge=1)
    # One address may hold at most this many of them, so one faulty device cannot take every slot.
    max_associations_per_peer: int = Field(default=8, ge=1)
    network_timeout_seconds: float = Field(default=60.0, gt=0)
    tls_cert: OptionalPath = None
    tls_key: OptionalPath = None
    tls_ca: OptionalPath = None
    tls_require_client_cert: bool = True

    # Where `ccfnet reprocess --from pacs` pulls studies from (DICOMweb QIDO/WADO-RS, or DIMSE C-FIND/C-GET).
    reprocess_source: Destination | None = None

    # DICOMweb intake (STOW-RS): sender name -> bearer token; none configured = the endpoint refuses all.
    stow_senders: dict[str, SecretStr] = Field(default_factory=dict)
    # A STOW-RS request body over this many MiB is refused (413) as soon as it passes it.
    stow_max_request_mb: int = Field(default=512, ge=1)

    # Storage
    data_dir: Path = DEFAULT_DATA_DIR  # set but empty: this default, like the optional paths
    spool_dir: OptionalPath = None
    min_free_disk_mb: int = Field(default=1024, ge=0)

    # Database and broker (unset: embedded SQLite and on-disk broker under data_dir)
    database_url: SecretStr | None = None
    broker_url: SecretStr | None = None
    redis_key_prefix: str = ""

    # Study assembly and queue
    study_quiet_seconds: float = Field(default=60.0, ge=0)
    sweep_interval_seconds: float = Field(default=5.0, gt=0)
    reconcile_interval_seconds: float = Field(default=30.0, gt=0)
    reconcile_grace_seconds: float = Field(default=60.0, ge=0)
    task_time_limit_seconds: int = Field(default=900, ge=1)
    task_soft_time_limit_seconds: int = Field(default=840, ge=1)
    # A running job whose worker vanished is taken back this long after its time limit would have ended it.
    job_lease_margin_seconds: float = Field(default=60.0, ge=0)
    embedded_worker_threads: int = Field(default=2, ge=1)

    # Model and results
    model_path: OptionalPath = None
    model_device: Literal["auto", "cpu", "cuda"] = "auto"
    include_segmentation: bool = False
    # BINARY: one region per structure, what viewers load; FRACTIONAL: the heatmaps, for research viewers.
    segmentation_type: Literal["binary", "fractional"] = "binary"
    declined_sr: bool = True  # a study the anatomy gate declines gets a short "not analysed: <reason>" SR
    destinations: list[Destination] = Field(default_factory=list)
    export_max_attempts: int = Field(default=8, ge=1)
    export_backoff_seconds: float = Field(default=30.0, gt=0)  # first retry; doubles per attempt, jittered
    export_backoff_max_seconds: float = Field(default=3600.0, gt=0)

    # Operations HTTP: the ops page, /metrics and STOW-RS. Unset port: ``ccfnet serve`` uses 8080 (an in-process
    # Service, as the tests start it, then serves no HTTP). http_bind is also where a worker's /metrics listens.
    http_port: int | None = Field(default=None, ge=0, le=65535)
    http_bind: str = "127.0.0.1"
    ops_token: SecretStr | None = None  # when set, every route but /metrics needs it
    worker_metrics_port: int | None = Field(default=None, ge=0, le=65535)  # ``ccfnet worker``'s, on http_bind

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _check_ae_title(value, "ae_title")

    @field_validator("data_dir", mode="before")
    @classmethod
    def _data_dir(cls, value: Any) -> Any:
        return DEFAULT_DATA_DIR if _blank_as_unset(value) is None else value

    @field_validator("allowed_calling_aets", mode="before")
    @classmethod
    def _calling_aets(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _calling_aets_valid(cls, value: list[str]) -> list[str]:
        return [_check_ae_title(v, "allowed_calling_aets entry") for v in value]

    @field_validator("extra_storage_sop_classes", mode="before")
    @classmethod
    def _extra_sop(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("extra_storage_sop_classes")
    @classmethod
    def _extra_sop_valid(cls, value: list[str]) -> list[str]:
        from pydicom.uid import UID

        for uid in value:
            if not UID(uid).is_valid:
                raise ValueError(f"not a valid UID: {uid!r}")
        return value

    @field_validator("allowed_peer_addresses", mode="before")
    @classmethod
    def _peers(cls, value: Any) -> Any:
        items = _split_list(value)
        if isinstance(items, list):
            return [ipaddress.ip_network(str(item), strict=False) for item in items]
        return items

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        if self.task_soft_time_limit_seconds > self.task_time_limit_seconds:
            raise ValueError("task_soft_time_limit_seconds must not exceed task_time_limit_seconds")
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError("destinations must have distinct names (each export row names its destination)")
        return self

    # Derived values -----------------------------------------------------------------------------------
    @property
    def spool_path(self) -> Path:
        return self.spool_dir if self.spool_dir is not None else self.data_dir / "spool"

    @property
    def broker_folder(self) -> Path:
        """Where the on-disk (embedded) broker keeps its messages."""
        return self.data_dir / "broker"

    @property
    def effective_database_url(self) -> str:
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{(self.data_dir / 'ccfnet.sqlite3').resolve()}"

    @property
    def effective_broker_url(self) -> str:
        if self.broker_url is not None:
            return self.broker_url.get_secret_value()
        return "filesystem://"

    @property
    def uses_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    def for_embedded(self) -> Settings:
        """The same settings with SQLite and the on-disk broker, as ``serve --embedded`` runs."""
        update: dict[str, Any] = {"broker_url": None}
        if not self.uses_sqlite:
            update["database_url"] = None
        return self.model_copy(update=update)


def _variable_name(loc: tuple[int | str, ...]) -> str:
    if not loc:
        return "configuration"
    head = str(loc[0])
    rest = "".join(f"[{part}]" for part in loc[1:])
    return f"{ENV_PREFIX}{head.upper()}{rest}"


def get_settings(**overrides: Any) -> Settings:
    """Build the settings at the process edge; raise :class:`SettingsError` naming each bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{_variable_name(err['loc'])}: {err['msg']}" for err in exc.errors())
        raise SettingsError(f"invalid configuration: {problems}") from exc
