"""walship's settings: validated, from flags, environment and a TOML file.

Precedence, highest first: explicit overrides (command-line flags) > environment
(``WALSHIP_`` prefix, ``__`` between nested names, e.g.
``WALSHIP_KAFKA__BOOTSTRAP_SERVERS``) > TOML file (``--config`` or
``WALSHIP_CONFIG``) > defaults.

The core never sees these models: components take plain arguments, and the CLI
translates settings into them (``KafkaConnection.aiokafka_kwargs()`` for Kafka
clients). ``load_settings`` reports every invalid setting at once, one line each,
naming the setting, its environment variable, the offending value (secrets
masked), where the value came from, and what is allowed.
"""

from __future__ import annotations

import contextvars
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)
from walship.shared.crypto import KEY_ID_MAX, Keyring, decode_key
from walship.shared.errors import ConfigError

ENV_PREFIX = "WALSHIP_"
ENV_NESTED_DELIMITER = "__"
CONFIG_ENV = "WALSHIP_CONFIG"
SECRET_MASK = "**********"

# Kafka's own rules for topic names (kafka.common.internals.Topic).
_TOPIC_CHARS = re.compile(r"^[A-Za-z0-9._-]+$")
TOPIC_NAME_MAX = 249
# Reader ids become part of a consumer group name and of file names.
_READER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Matches walship.shared.codec.MESSAGE_BYTES_MAX_DEFAULT (kept literal so the
# settings do not import the codec): below Kafka's default 1 MB message limit.
MESSAGE_BYTES_MAX_DEFAULT = 900_000


def _field_error(field: str, value: object, message: str) -> PydanticCustomError:
    """A cross-field error that names the field it is about (not the whole model)."""
    return PydanticCustomError("walship_field", message, {"field": field, "value": value})


def check_topic_name(name: str) -> str:
    """Return ``name`` if Kafka accepts it as a topic name, else raise ValueError."""
    if not name:
        raise ValueError("a topic name cannot be empty")
    if name in (".", ".."):
        raise ValueError("a topic name cannot be '.' or '..'")
    if len(name) > TOPIC_NAME_MAX:
        raise ValueError(f"a topic name has at most {TOPIC_NAME_MAX} characters (got {len(name)})")
    if not _TOPIC_CHARS.match(name):
        raise ValueError("a topic name may contain only ASCII letters, digits, '.', '_' and '-'")
    return name


def parse_bootstrap_servers(value: str) -> list[tuple[str, int]]:
    """Split ``host:port[,host:port...]`` (IPv6 as ``[addr]:port``); ValueError if invalid."""
    servers: list[tuple[str, int]] = []
    for raw in value.split(","):
        server = raw.strip()
        if not server:
            raise ValueError("empty server in the list; expected host:port[,host:port...]")
        if server.startswith("["):
            host, sep, port = server[1:].partition("]:")
            if not sep:
                raise ValueError(f"server {server!r} has no port; expected [ipv6]:port")
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"server {server!r}: {host!r} is not an IPv6 address") from None
        else:
            host, sep, port = server.rpartition(":")
            if not sep:
                raise ValueError(f"server {server!r} has no port; expected host:port")
            if not host or ":" in host or any(c.isspace() for c in host):
                raise ValueError(
                    f"server {server!r} has no valid host; expected host:port "
                    "(write IPv6 addresses as [addr]:port)"
                )
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"server {server!r} has an invalid port; expected 1..65535")
        servers.append((host, int(port)))
    return servers


def _default_reader_id() -> str:
    # The host name is unique per pod/container, so scaled-out readers get
    # distinct consumer groups without per-instance configuration.
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:100].lstrip("._-")
    return host or "reader"


class KafkaConnection(BaseModel):
    """How to reach the Kafka cluster (also used for kafka:// snapshot stores)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bootstrap_servers: str = Field(
        default="localhost:9092", description="Comma-separated host:port list of Kafka brokers."
    )
    client_id: str = Field(default="walship", min_length=1, description="Kafka client id.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="Kafka security protocol."
    )
    ssl_cafile: Path | None = Field(
        default=None, description="CA bundle (PEM) to verify brokers; system CAs if unset."
    )
    ssl_certfile: Path | None = Field(
        default=None, description="Client certificate (PEM) for mutual TLS."
    )
    ssl_keyfile: Path | None = Field(
        default=None, description="Client private key (PEM) for mutual TLS."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None, description="SASL mechanism; required with SASL_PLAINTEXT and SASL_SSL."
    )
    sasl_username: str | None = Field(default=None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(
        default=None, description="SASL password (never logged or printed)."
    )

    @field_validator("bootstrap_servers")
    @classmethod
    def _check_servers(cls, value: str) -> str:
        parse_bootstrap_servers(value)
        return ",".join(s.strip() for s in value.split(","))

    @field_validator("ssl_cafile", "ssl_certfile", "ssl_keyfile")
    @classmethod
    def _check_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {str(value)!r} does not exist or is not a regular file")
        return value

    @model_validator(mode="after")
    def _check_security(self) -> KafkaConnection:
        proto = self.security_protocol
        sasl = proto.startswith("SASL_")
        tls = proto.endswith("SSL")
        if not tls:
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                if getattr(self, name) is not None:
                    raise _field_error(
                        name,
                        str(getattr(self, name)),
                        f"is set but security_protocol is {proto}; use SSL or SASL_SSL",
                    )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            missing = "ssl_keyfile" if self.ssl_keyfile is None else "ssl_certfile"
            raise _field_error(missing, None, "mutual TLS needs both ssl_certfile and ssl_keyfile")
        if sasl:
            for name in ("sasl_mechanism", "sasl_username", "sasl_password"):
                if getattr(self, name) is None:
                    raise _field_error(name, None, f"is required with security_protocol {proto}")
        elif self.sasl_mechanism is not None:
            raise _field_error(
                "sasl_mechanism",
                self.sasl_mechanism,
                f"is set but security_protocol is {proto}; use SASL_PLAINTEXT or SASL_SSL",
            )
        return self

    @property
    def servers(self) -> list[tuple[str, int]]:
        return parse_bootstrap_servers(self.bootstrap_servers)

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for any aiokafka client (producer, consumer, admin).

        Includes bootstrap_servers and client_id; callers may override them.
        """
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol.endswith("SSL"):
            from aiokafka.helpers import create_ssl_context

            kwargs["ssl_context"] = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
                certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
                keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
            )
        if self.security_protocol.startswith("SASL_"):
            # aiokafka takes the sasl_plain_* pair for SCRAM as well.
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        return kwargs


class TopicSettings(BaseModel):
    """The stream's topic; used when creating it and checked against an existing one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="walship", description="Topic that carries the stream.")
    partitions: int = Field(
        default=6, ge=1, description="Partition count (fixed for a stream's life)."
    )
    replication_factor: int = Field(
        default=3, ge=1, description="Replicas per partition when walship creates the topic."
    )
    retention_ms: int | None = Field(
        default=None,
        ge=-1,
        description="Topic retention.ms (-1: forever); broker default if unset.",
    )
    min_insync_replicas: int | None = Field(
        default=None,
        ge=1,
        description="Topic min.insync.replicas (2 with 3 replicas is usual); broker default if unset.",
    )
    max_message_bytes: int | None = Field(
        default=None,
        ge=1024,
        description="Topic max.message.bytes; broker default (about 1 MB) if unset.",
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return check_topic_name(value)

    @model_validator(mode="after")
    def _check_isr(self) -> TopicSettings:
        isr = self.min_insync_replicas
        if isr is not None and isr > self.replication_factor:
            raise _field_error(
                "min_insync_replicas",
                isr,
                f"must be <= replication_factor ({self.replication_factor}), "
                "or no write could ever be acknowledged",
            )
        return self


class TelemetrySettings(BaseModel):
    """OpenTelemetry; exporters are configured with the standard OTEL_* variables."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    service_name: str = Field(
        default="walship",
        min_length=1,
        description="Prefix of service.name: <prefix>-writer, -producer, -reader "
        "(OTEL_SERVICE_NAME wins if set).",
    )


class ProducerSettings(BaseModel):
    """The writer side: WAL and publisher."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    linger_ms: int = Field(
        default=5, ge=0, description="How long the publisher waits to fill a batch."
    )
    batch_bytes_max: int = Field(
        default=512 << 10,
        ge=1024,
        description="Uncompressed bytes the publisher takes from the WAL at once.",
    )
    message_bytes_max: int = Field(
        default=MESSAGE_BYTES_MAX_DEFAULT,
        ge=1024,
        description="Largest Kafka message walship produces (larger transactions are split).",
    )
    in_flight_bytes_max: int = Field(
        default=32 << 20, ge=1024, description="Bytes produced but not yet acknowledged by Kafka."
    )
    fsync: Literal["always", "batch", "interval"] = Field(
        default="batch",
        description="WAL fsync policy: always (per append), batch (per group commit), interval.",
    )
    fsync_interval_ms: int = Field(
        default=100, ge=1, description="fsync period for fsync=interval."
    )
    wal_bytes_max: int | None = Field(
        default=1 << 30,
        ge=4096,
        description="WAL size limit; appends fail (retriably) beyond it. Unset: no limit.",
    )
    segment_bytes_max: int = Field(default=64 << 20, ge=4096, description="WAL segment file size.")
    zstd_dictionary: bool = Field(
        default=False,
        description="Train a zstd dictionary on the first transactions, ship it on "
        "<topic>.dicts and compress with it (pays off for small transactions).",
    )
    dictionary_bytes: int = Field(
        default=16384, ge=256, le=1 << 20, description="Size of the trained zstd dictionary."
    )
    dictionary_sample_bytes: int = Field(
        default=1 << 20, ge=4096, description="Transaction bytes sampled before training."
    )
    wal_release: Literal["published", "snapshotted", "never"] = Field(
        default="published",
        description="When the writer deletes WAL segments: once published; once published and "
        "covered by a writer snapshot (the WAL can then re-feed a topic that lost data); never.",
    )
    snapshot_every_seqs: int | None = Field(
        default=100_000,
        ge=1,
        description="Writer snapshot after this many sequences (needs snapshot_url).",
    )
    snapshot_every_s: int | None = Field(
        default=3600,
        ge=1,
        description="Writer snapshot after this many seconds (needs snapshot_url).",
    )
    http_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port for /healthz, /readyz, /metrics; off if unset.",
    )
    auto_create_topic: bool = Field(
        default=True, description="Create the topic (with the topic settings) if it does not exist."
    )

    @model_validator(mode="after")
    def _check_wal(self) -> ProducerSettings:
        if self.wal_bytes_max is not None and self.wal_bytes_max < self.segment_bytes_max:
            raise _field_error(
                "wal_bytes_max",
                self.wal_bytes_max,
                f"must be >= segment_bytes_max ({self.segment_bytes_max})",
            )
        return self


class ConsumerSettings(BaseModel):
    """A reader (replica)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reader_id: str = Field(
        default_factory=_default_reader_id,
        description="This reader's id; its consumer group is `walship.<topic>.<reader_id>`.",
        json_schema_extra={"default_doc": "host name"},
    )
    replica_synchronous: Literal["off", "normal", "full"] = Field(
        default="normal", description="SQLite synchronous mode of the replica."
    )
    bootstrap_policy: Literal["when_needed", "initial", "never"] = Field(
        default="when_needed",
        description="Load a snapshot when retention expired (when_needed), only into an "
        "empty replica (initial), or never (stop with an error).",
    )
    gap_timeout_ms: int = Field(
        default=30_000, ge=1, description="How long a missing sequence is awaited before acting."
    )
    apply_entries_max: int = Field(
        default=50_000,
        ge=1,
        description="Most entries applied in one SQLite transaction (whole WAL transactions; "
        "one may exceed it). Groups grow toward it while the reader is behind: fewer, larger "
        "commits; more memory.",
    )
    apply_linger_ms: int = Field(
        default=0,
        ge=0,
        description="How long a caught-up reader waits for more entries before applying what "
        "is ready (0: at once, for the lowest latency; a reader that is behind batches anyway "
        "while its previous apply runs).",
    )
    fetch_max_wait_ms: int = Field(
        default=100,
        ge=1,
        description="How long a broker may hold a fetch that has no new data (Kafka "
        "fetch.max.wait.ms). A Kafka broker answers as soon as data arrives, so this only sets "
        "how often an idle reader asks; the embedded dev cluster holds every fetch this long.",
    )
    buffer_bytes_max: int = Field(
        default=16 << 20,
        ge=1 << 20,
        description="Most bytes of decoded batches the reader holds ahead of its applies, over "
        "all partitions: beyond it the partitions ahead of the merge point are paused until "
        "half has drained (keeps RSS flat on any backlog).",
    )
    fetch_bytes_max: int = Field(
        default=8 << 20,
        ge=1 << 20,
        description="Most bytes one fetch may return (Kafka fetch.max.bytes; aiokafka's default "
        "is 50 MB). A first message larger than this is still returned.",
    )
    ready_lag_seqs: int = Field(
        default=1000, ge=0, description="/readyz is ready when lag is at most this many sequences."
    )
    heartbeat_interval_ms: int = Field(
        default=5000, ge=100, description="Lag/heartbeat report period."
    )
    snapshot_every_seqs: int | None = Field(
        default=None,
        ge=1,
        description="Reader-side snapshots every N sequences (needs snapshot_url).",
    )
    http_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port for /healthz, /readyz, /metrics; off if unset.",
    )

    @field_validator("reader_id")
    @classmethod
    def _check_reader_id(cls, value: str) -> str:
        if not _READER_ID.match(value):
            raise ValueError(
                "must be 1-100 characters: ASCII letters, digits, '.', '_', '-', "
                "starting with a letter or digit"
            )
        return value


# The TOML file of the current load_settings call (None: use WALSHIP_CONFIG).
_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "walship_config_file", default=None
)


def _resolve_config_file(explicit: Path | None) -> tuple[Path | None, str]:
    """The TOML file to read and how it was named (for messages)."""
    if explicit is not None:
        path, origin = Path(explicit), "--config"
    elif os.environ.get(CONFIG_ENV):
        path, origin = Path(os.environ[CONFIG_ENV]), CONFIG_ENV
    else:
        return None, ""
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} (from {origin}) does not exist or is not a file"
        )
    try:
        with path.open("rb") as f:
            tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror}") from exc
    return path, origin


class WalshipSettings(BaseSettings):
    """Every walship setting (see the configuration reference in README.md)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        case_sensitive=False,
        extra="forbid",
        frozen=True,
        # An empty variable means "not set" (a common shell idiom).
        env_ignore_empty=True,
        env_parse_none_str="null",
    )

    kafka: KafkaConnection = Field(default_factory=KafkaConnection)
    topic: TopicSettings = Field(default_factory=TopicSettings)
    data_dir: Path = Field(
        default=Path("walship-data"),
        description="Directory for the WAL, identity and SQLite state.",
    )
    snapshot_url: str | None = Field(
        default=None,
        description="Snapshot store: file:///absolute/dir or kafka://topic; none if unset.",
    )
    snapshot_keep: int = Field(
        default=3, ge=1, description="Periodic snapshots keep only the newest this many."
    )
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    producer: ProducerSettings = Field(default_factory=ProducerSettings)
    consumer: ConsumerSettings = Field(default_factory=ConsumerSettings)
    encryption_key_id: int | None = Field(
        default=None,
        ge=1,
        le=KEY_ID_MAX,
        description="Key (an id of encryption_keys) that encrypts new Kafka payloads and "
        "snapshot chunks with AES-256-GCM; unset: no encryption.",
    )
    encryption_keys: dict[int, SecretStr] = Field(
        default_factory=dict,
        description="Keyring: id (1..4294967295) -> base64 of a 32-byte key, e.g. "
        '`{"1": "<base64>"}`; readers need every id still in the log and snapshots '
        "(never logged or printed).",
        json_schema_extra={"default_doc": "{}"},
    )

    @field_validator("encryption_keys")
    @classmethod
    def _check_encryption_keys(cls, value: dict[int, SecretStr]) -> dict[int, SecretStr]:
        # Messages name the key id, never the key.
        for key_id, secret in value.items():
            if not 1 <= key_id <= KEY_ID_MAX:
                raise ValueError(f"key id {key_id} is not in 1..{KEY_ID_MAX}")
            try:
                decode_key(secret.get_secret_value())
            except ValueError as exc:
                raise ValueError(f"key {key_id} {exc}") from None
        return value

    @model_validator(mode="after")
    def _check_encryption_key_id(self) -> WalshipSettings:
        current = self.encryption_key_id
        if current is not None and current not in self.encryption_keys:
            held = ", ".join(map(str, sorted(self.encryption_keys))) or "none"
            raise _field_error(
                "encryption_key_id",
                current,
                f"names no key of encryption_keys (ids: {held})",
            )
        if current is not None and self.producer.zstd_dictionary:
            # A dictionary is trained on payloads and shipped in plaintext on <topic>.dicts.
            raise _field_error(
                "producer.zstd_dictionary",
                True,
                "cannot be used with encryption_key_id: the dictionary is trained on "
                "payload data and shipped unencrypted on <topic>.dicts",
            )
        return self

    def keyring(self) -> Keyring | None:
        """The keyring for encoders and decoders; None when no key is configured."""
        if not self.encryption_keys:
            return None
        return Keyring.from_base64(
            {i: k.get_secret_value() for i, k in self.encryption_keys.items()},
            self.encryption_key_id,
        )

    @field_validator("snapshot_url")
    @classmethod
    def _check_snapshot_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
                raise ValueError("a file URL must be file:///absolute/path")
        elif parts.scheme == "kafka":
            if parts.path not in ("", "/") or parts.query or parts.fragment:
                raise ValueError("a kafka URL must be kafka://<topic>")
            try:
                check_topic_name(parts.netloc)
            except ValueError as exc:
                raise ValueError(f"kafka://<topic>: {exc}") from None
        else:
            raise ValueError("must start with file:// or kafka://")
        return value

    @model_validator(mode="after")
    def _check_message_size(self) -> WalshipSettings:
        topic_max = self.topic.max_message_bytes
        if topic_max is not None and self.producer.message_bytes_max > topic_max:
            raise _field_error(
                "producer.message_bytes_max",
                self.producer.message_bytes_max,
                f"must be <= topic.max_message_bytes ({topic_max}) or Kafka rejects messages",
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = _config_file.get()
        if config_file is None:
            config_file, _ = _resolve_config_file(None)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


# --- loading and error reporting ----------------------------------------------


def env_var_name(dotted: str) -> str:
    """``kafka.bootstrap_servers`` -> ``WALSHIP_KAFKA__BOOTSTRAP_SERVERS``."""
    return ENV_PREFIX + ENV_NESTED_DELIMITER.join(dotted.split(".")).upper()


def iter_fields(
    model: type[BaseModel] = WalshipSettings, prefix: str = ""
) -> Iterator[tuple[str, Any]]:
    """(dotted name, FieldInfo) for every leaf setting, in declaration order."""
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from iter_fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def _secret_fields() -> frozenset[str]:
    return frozenset(
        dotted for dotted, info in iter_fields() if "SecretStr" in str(info.annotation)
    )


def _nest(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"kafka__bootstrap_servers": x}`` or ``{"kafka.bootstrap_servers": x}`` -> nested."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = key.replace(".", ENV_NESTED_DELIMITER).split(ENV_NESTED_DELIMITER)
        node = nested
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r} conflicts with a value for {part!r}")
            node = child
        if isinstance(value, Mapping) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = dict(value) if isinstance(value, Mapping) else value
    return nested


def _lookup(data: Mapping[str, Any], path: tuple[str, ...]) -> tuple[bool, Any]:
    node: Any = data
    for part in path:
        if not isinstance(node, Mapping):
            return False, None
        matches = [k for k in node if isinstance(k, str) and k.lower() == part.lower()]
        if not matches:
            return False, None
        node = node[matches[0]]
    return True, node


class _Sources:
    """Where each setting came from: flags, environment, file, or default."""

    def __init__(
        self,
        overrides: dict[str, Any],
        flag_names: Mapping[str, str],
        config_file: Path | None,
    ) -> None:
        self.overrides = overrides
        self.flag_names = flag_names
        self.config_file = config_file
        try:
            self.env: dict[str, Any] = EnvSettingsSource(WalshipSettings)()
        except SettingsError:
            self.env = {}
        self.file: dict[str, Any] = {}
        if config_file is not None:
            self.file = TomlConfigSettingsSource(WalshipSettings, toml_file=config_file)()

    def origin(self, path: tuple[str, ...]) -> tuple[str, bool, Any]:
        """(label, found, raw value) of the highest-precedence source holding ``path``."""
        dotted = ".".join(path)
        found, value = _lookup(self.overrides, path)
        if found:
            flag = self.flag_names.get(dotted)
            return (f"flag {flag}" if flag else "argument"), True, value
        found, value = _lookup(self.env, path)
        if found:
            return f"env {env_var_name(dotted)}", True, value
        found, value = _lookup(self.file, path)
        if found:
            return f"file {self.config_file}", True, value
        return "default", False, None


def _describe(err: Mapping[str, Any]) -> str:
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if msg.startswith("Input should be "):
        msg = "must be " + msg[len("Input should be ") :]
    if err["type"] == "extra_forbidden":
        msg = "is not a walship setting (misspelled?)"
    return msg


def _format_problems(exc: ValidationError, sources: _Sources) -> list[str]:
    secrets = _secret_fields()
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        loc = tuple(str(p) for p in err["loc"])
        ctx = err.get("ctx") or {}
        has_value = True
        if err["type"] == "walship_field":
            path = (*loc, *str(ctx["field"]).split("."))
            value: Any = ctx.get("value")
            has_value = value is not None
        else:
            path, value = loc, err.get("input")
        dotted = ".".join(path)
        label, found, raw = sources.origin(path)
        if found and err["type"] != "walship_field":
            value = raw
        if isinstance(value, Mapping):
            has_value = False  # a whole table: the message says what is wrong
        if err["type"] == "missing" or not has_value:
            shown = ""
        elif (
            dotted in secrets
            or any(dotted.startswith(f"{s}.") for s in secrets)
            or isinstance(value, SecretStr)
        ):
            shown = f" = {SECRET_MASK}"
        else:
            shown = f" = {value!r}"
        where = label if label.startswith("env ") else f"{label}; env {env_var_name(dotted)}"
        lines.append(f"{dotted or '(settings)'}{shown} (from {where}): {_describe(err)}")
    return lines


def load_settings_from(
    config_file: Path | None,
    overrides: Mapping[str, Any],
    flag_names: Mapping[str, str],
) -> WalshipSettings:
    """``load_settings`` for the CLI: ``flag_names`` maps dotted settings to the
    flags that set them, so messages say "from flag --partitions"."""
    path, _ = _resolve_config_file(config_file)
    nested = _nest(overrides)
    token = _config_file.set(path)
    try:
        try:
            return WalshipSettings(**nested)
        except SettingsError as exc:
            # The environment holds something pydantic-settings cannot parse
            # (e.g. WALSHIP_KAFKA='not json').
            raise ConfigError(f"invalid settings: {exc}") from None
        except ValidationError as exc:
            problems = _format_problems(exc, _Sources(nested, flag_names, path))
            count = len(problems)
            header = f"invalid settings ({count} problem{'s' if count != 1 else ''}):"
            raise ConfigError("\n  ".join([header, *problems])) from None
    finally:
        _config_file.reset(token)


def load_settings(config_file: Path | None = None, **overrides: Any) -> WalshipSettings:
    """Load and validate settings; raise ConfigError listing every problem.

    ``overrides`` win over everything else. Keys are field names, nested with
    ``__`` (``kafka__bootstrap_servers="k:9092"``), or whole tables
    (``kafka={"bootstrap_servers": "k:9092"}``). ``config_file`` defaults to
    ``WALSHIP_CONFIG``.
    """
    return load_settings_from(config_file, overrides, {})


def effective_settings(settings: WalshipSettings) -> dict[str, Any]:
    """Settings as plain JSON-able data, secrets masked."""
    data: dict[str, Any] = settings.model_dump(mode="json")
    return data


def setting_sources(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Dotted setting name -> where its effective value comes from (flag/env/file/default)."""
    path, _ = _resolve_config_file(config_file)
    sources = _Sources(_nest(overrides or {}), flag_names or {}, path)
    return {dotted: sources.origin(tuple(dotted.split(".")))[0] for dotted, _ in iter_fields()}
