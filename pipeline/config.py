"""The worker's configuration: one YAML file plus `ENVOYGEO_...` environment overrides.

Why one set of pydantic models: every setting is validated once, at start, and an
error names the exact key (`elasticsearch.bulk_max_docs: ...`) instead of surfacing as
a librdkafka or HTTP failure minutes later. Environment variables use `__` between
levels (`ENVOYGEO_KAFKA__BOOTSTRAP_SERVERS=...`) and win over the file, so one
ConfigMap can serve many deployments.

`pipeline.config_sources` turns the file and the environment into the mapping these
models validate (${VAR} expansion, ENVOYGEO_* variables checked against the models,
lists from JSON or commas); `load_settings` reports every problem of all three steps
and of the models at once, one `key: why` line each. What needs files or client
libraries beyond the text (GeoIP databases, the CA file, librdkafka's verdict) is
`pipeline.preflight`, shared by `run` and `check-config`.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline import config_sources as sources
from pipeline import omit as omit_mod
from pipeline.clientip import MIN_HASH_KEY_BYTES, PrivacyPolicy
from pipeline.decode.parser import make_parser
from pipeline.enrich.alerts import AlertRule
from pipeline.enrich.geoip import GeoIPConfig
from pipeline.enrich.rates import RatesConfig

SECRET_KEYS = ("password", "api_key", "sasl.password", "ssl.key.password", "ssl.keystore.password",
               "hash_key")


def _check_cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a CIDR: {exc}") from None
    return value


CIDR = Annotated[str, AfterValidator(_check_cidr)]


def _check_broker(entry: str) -> None:
    """`host[:port]`, `[ipv6][:port]`, optionally `protocol://` first, as librdkafka reads
    bootstrap.servers."""
    form = "expected host:port[,host:port...]"
    address = entry.split("://", 1)[-1]
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest.removeprefix(":") if rest else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"{entry!r}: {form}")
    elif address.count(":") > 1:
        host, port = address, ""  # a bare IPv6 address
    else:
        host, _, port = address.partition(":")
    if not host or any(c.isspace() or c in "/@?#" for c in host):
        raise ValueError(f"{entry!r} is not a broker address ({form})")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535 ({form})")


class _Section(BaseModel):
    # A misspelt key is an error, not a silently ignored default.
    model_config = ConfigDict(extra="forbid")


def check_readable(path: Path | None) -> Path | None:
    """A file a client reads later (a CA, a key, a secret), opened now, so a missing or
    unreadable one is an error naming its key at start, not a handshake failure."""
    if path is not None:
        try:
            with path.open("rb") as f:
                f.read(1)
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    return path


def read_secret(path: Path) -> str:
    """A secret file's text (a Kubernetes Secret volume, `echo pw > file`): one trailing
    newline is not part of it."""
    text = path.read_text()
    return text[:-1] if text.endswith("\n") else text


def secret_value(inline: SecretStr | None, path: Path | None) -> str | None:
    """The secret set inline (or by its ENVOYGEO_* variable) or in its `*_file`."""
    if inline is not None:
        return inline.get_secret_value()
    return read_secret(path) if path is not None else None


def _one_of(model: BaseModel, *secrets: str) -> None:
    """`password` or `password_file`, not both: which one would win is not obvious."""
    for secret in secrets:
        if getattr(model, secret) is not None and getattr(model, f"{secret}_file") is not None:
            raise ValueError(f"set {secret} or {secret}_file, not both")


class KafkaSecuritySettings(_Section):
    """How the worker authenticates to Kafka and encrypts the connection, for the common
    cases; `pipeline.kafka_security` maps it onto librdkafka for every Kafka client.
    Anything rarer goes in `kafka.librdkafka`, whose keys win over these."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = Field(
        None, description="File holding the SASL password (a Kubernetes Secret volume); "
                          "one trailing newline is ignored.")
    ca_file: Path | None = Field(
        None, description="PEM CA certificate(s) the broker's certificate must chain to "
                          "(default: librdkafka's, usually the system store).")
    cert_file: Path | None = Field(None, description="PEM client certificate (mTLS).")
    key_file: Path | None = Field(None, description="PEM private key of cert_file.")
    key_password: SecretStr | None = None
    key_password_file: Path | None = None

    @field_validator("password_file", "ca_file", "cert_file", "key_file", "key_password_file")
    @classmethod
    def _readable(cls, v: Path | None) -> Path | None:
        # Read at connect time by librdkafka (or at start, the password): checked now,
        # so the error names the key instead of surfacing as a handshake failure.
        return check_readable(v)

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSecuritySettings:
        sasl = self.protocol.startswith("SASL_")
        tls = self.protocol.endswith("SSL")
        for secret in ("password", "key_password"):
            if getattr(self, secret) is not None and getattr(self, f"{secret}_file") is not None:
                raise ValueError(f"set {secret} or {secret}_file, not both")
        if sasl and not self.username:
            raise ValueError(f"protocol {self.protocol} needs username")
        if sasl and self.password is None and self.password_file is None:
            raise ValueError(f"protocol {self.protocol} needs password or password_file")
        if not sasl and (self.username or self.password or self.password_file):
            raise ValueError(f"username/password are only used with SASL_PLAINTEXT or "
                             f"SASL_SSL, not {self.protocol}")
        files = ("ca_file", "cert_file", "key_file", "key_password", "key_password_file")
        if not tls and any(getattr(self, f) is not None for f in files):
            raise ValueError(f"{'/'.join(files[:3])} are only used with SSL or SASL_SSL, "
                             f"not {self.protocol}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class KafkaSettings(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    topics: list[str] = Field(default_factory=lambda: ["envoy-access-logs"])
    topic_pattern: str | None = Field(
        None, description="Regex of topics to consume instead of `topics` (librdkafka '^' form)."
    )
    group_id: str = "envoygeo"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    dead_letter_topic: str = "envoygeo-dead-letter"
    alerts_topic: str = "envoygeo-alerts"
    topic_partitions: int = Field(6, ge=1, description="Partitions for topics `setup` creates.")
    batch_max_records: int = Field(2000, ge=1)
    batch_max_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    batch_max_wait_ms: int = Field(500, ge=1)
    session_timeout_ms: int = Field(
        10000, ge=1000,
        description="Classic protocol: how long a member that vanished for good (not "
                    "restarted) keeps its partitions. A restarted static member takes "
                    "them back at once, so this no longer bounds crash recovery.")
    static_membership: bool = Field(
        True, description="Join with a stable group.instance.id, so a restarted worker "
                          "gets its partitions back at once instead of after the dead "
                          "member's session timeout.")
    group_instance_id: str | None = Field(
        None, min_length=1, max_length=249,
        description="This worker's static member id. Default: the host name (the pod "
                    "name on Kubernetes), or <host>-<n> for the n-th further worker "
                    "running on the same host. Must be unique within the group.")
    group_protocol: Literal["classic", "consumer"] = Field(
        "classic",
        description="Consumer group protocol: classic (the fastest crash recovery, "
                    "measured by `bench recovery`), or consumer (KIP-848, Kafka 4.0+ "
                    "brokers; a crashed member's partitions then wait for the broker's "
                    "group.consumer.session.timeout.ms, 45 s by default).")
    commit_interval_ms: int = Field(
        1000, ge=0, le=60000,
        description="While records keep flowing, commit finished offsets at most this "
                    "often (0: after every batch; a caught-up worker commits at once). "
                    "Each commit is a group-coordinator write; a crash replays at most "
                    "this much more, which overwrites by document id.")
    statistics_interval_ms: int = Field(5000, ge=0, description="0 disables lag metrics.")
    security: KafkaSecuritySettings = Field(default_factory=KafkaSecuritySettings)
    librdkafka: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="Passed to librdkafka as is (any client property); a key set here "
                    "wins over the one kafka.security maps to.",
    )

    @field_validator("topic_pattern")
    @classmethod
    def _pattern_anchor(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("^"):
            raise ValueError("librdkafka treats a topic as a regex only when it starts with '^'")
        return v

    @field_validator("bootstrap_servers")
    @classmethod
    def _brokers(cls, v: str) -> str:
        # librdkafka accepts any text here and only fails, quietly and forever, when it
        # connects; a typo is caught here instead.
        for entry in v.split(","):
            _check_broker(entry.strip())
        return v


class ElasticsearchSettings(_Section):
    hosts: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:9200"])
    api_key: SecretStr | None = Field(
        None, description="Encoded API key (base64 of id:api_key), sent as "
                          "`Authorization: ApiKey ...`; wins over username/password.")
    api_key_file: Path | None = Field(
        None, description="File holding the encoded API key (a Kubernetes Secret volume).")
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = Field(
        None, description="File holding the basic-auth password; one trailing newline "
                          "is ignored.")
    ca_certs: Path | None = Field(
        None, description="PEM CA certificate(s) the server's certificate must chain to "
                          "(default: the system trust store).")
    verify_certs: bool = Field(
        True, description="false turns certificate and host name verification off "
                          "(a warning is logged at start); for tests only.")
    index: str = Field("envoygeo-logs", description="Index (or alias / data stream) written to.")
    alerts_index: str = "envoygeo-alerts"
    data_stream: bool = False
    bulk_max_docs: int = Field(2000, ge=1)
    bulk_max_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    concurrency: int = Field(2, ge=1, le=16, description="Bulk requests in flight at once.")
    request_timeout_s: float = Field(30.0, gt=0)
    retry_initial_backoff_ms: int = Field(200, ge=1)
    retry_max_backoff_ms: int = Field(30000, ge=1)

    @field_validator("hosts")
    @classmethod
    def _hosts_are_urls(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one host is needed")
        for host in v:
            if not host.startswith(("http://", "https://")):
                raise ValueError(f"{host!r} must start with http:// or https://")
            # The client's own parser, so what passes here is what `run` can connect to
            # (imported here: `envoygeo enrich` loads this module without needing it).
            from elasticsearch._sync.client.utils import hosts_to_node_configs

            hosts_to_node_configs([host])
        return v

    @field_validator("api_key_file", "password_file")
    @classmethod
    def _readable(cls, v: Path | None) -> Path | None:
        return check_readable(v)

    @model_validator(mode="after")
    def _credentials(self) -> ElasticsearchSettings:
        _one_of(self, "password", "api_key")
        if (self.password is not None or self.password_file is not None) and not self.username:
            raise ValueError("password/password_file need username")
        return self

    def api_key_value(self) -> str | None:
        return secret_value(self.api_key, self.api_key_file)

    def password_value(self) -> str | None:
        return secret_value(self.password, self.password_file)


class GeoIPSettings(GeoIPConfig):
    # The enrichment stage's own model, closed: a misspelt key is an error.
    model_config = ConfigDict(frozen=True, extra="forbid")


class ClientIPSettings(_Section):
    trusted_proxies: list[CIDR] = Field(
        default_factory=list,
        description="CIDRs of load balancers / proxies whose X-Forwarded-For entries are trusted.",
    )
    trusted_hops: int = Field(1, ge=0, le=32)
    envoy_use_remote_address: bool = Field(
        False,
        description="Envoy runs with use_remote_address: true, so the rightmost "
                    "X-Forwarded-For entry is the address Envoy saw: the client address "
                    "for formats that log none (Envoy's default), and never a hop.")


class PrivacySettings(_Section):
    """What of a client address the log index keeps. GeoIP, rate counts and alerts
    always use the full address; only the indexed access-log document changes (a
    separate section from client_ip, which says whom to believe, not what to store)."""

    client_ip: Literal["keep", "truncate", "hash"] = Field(
        "keep", description="keep: addresses as resolved. truncate: host bits zeroed "
                            "(still addresses: dashboards show networks). hash: a keyed "
                            "HMAC-SHA256 pseudonym in envoygeo.client_id, no address.")
    truncate_ipv4_prefix: int = Field(24, ge=0, le=32, description="truncate: IPv4 bits kept.")
    truncate_ipv6_prefix: int = Field(48, ge=0, le=128, description="truncate: IPv6 bits kept.")
    hash_key: SecretStr | None = Field(
        None, description="hash: the HMAC key (at least 16 bytes; a secret: whoever has "
                          "it can test guesses of an address).")
    hash_key_file: Path | None = Field(
        None, description="File holding hash_key (a Kubernetes Secret volume); one "
                          "trailing newline is ignored.")
    extra_fields: list[str] = Field(
        default_factory=list,
        description="envoy.extra keys of a custom format that hold client addresses "
                    "(e.g. REQ(x-real-ip)); masked like X-Forwarded-For.")

    @field_validator("hash_key_file")
    @classmethod
    def _readable(cls, v: Path | None) -> Path | None:
        return check_readable(v)

    @model_validator(mode="after")
    def _key(self) -> PrivacySettings:
        _one_of(self, "hash_key")
        key = self.hash_key_value()
        if self.client_ip != "hash":
            if key is not None:
                raise ValueError(f"hash_key/hash_key_file are only used with client_ip: "
                                 f"hash, not {self.client_ip}")
        elif key is None:
            raise ValueError("client_ip hash needs hash_key or hash_key_file")
        elif len(key.encode()) < MIN_HASH_KEY_BYTES:
            raise ValueError(f"hash_key must be at least {MIN_HASH_KEY_BYTES} bytes "
                             f"(it has {len(key.encode())})")
        return self

    def hash_key_value(self) -> str | None:
        return secret_value(self.hash_key, self.hash_key_file)

    def policy(self) -> PrivacyPolicy:
        """The resolver's `PrivacyPolicy` (the key read now, at start)."""
        key = self.hash_key_value()
        return PrivacyPolicy(self.client_ip, self.truncate_ipv4_prefix,
                             self.truncate_ipv6_prefix,
                             None if key is None else key.encode(), tuple(self.extra_fields))


class AlertRuleSettings(AlertRule):
    # The alert stage's rule, closed: a misspelt `windw_s` is an error, not a rule
    # that silently lacks its window.
    model_config = ConfigDict(frozen=True, extra="forbid")


class RatesSettings(RatesConfig):
    """The rate stage's model plus the switch and the alert rules that read its counts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    alerts: tuple[AlertRuleSettings, ...] = ()

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        # redis-py's own parser, the one `Redis.from_url` runs when the backend opens.
        from redis.connection import parse_url

        parse_url(v)
        return v

    @field_validator("redis_password_file", "redis_ca_file")
    @classmethod
    def _readable(cls, v: Path | None) -> Path | None:
        return check_readable(v)

    @model_validator(mode="after")
    def _redis_secrets(self) -> RatesSettings:
        from urllib.parse import urlsplit

        url = urlsplit(self.redis_url)
        if self.redis_password_file is not None and url.password is not None:
            raise ValueError("set the password in redis_url or redis_password_file, not both")
        if self.redis_ca_file is not None and url.scheme != "rediss":
            raise ValueError("redis_ca_file is only used with a rediss:// (TLS) redis_url")
        return self

    @model_validator(mode="after")
    def _rules_use_configured_windows(self) -> RatesSettings:
        for rule in self.alerts:
            if rule.window_s not in self.windows:
                raise ValueError(
                    f"alert rule {rule.name!r}: window_s {rule.window_s} is not one of "
                    f"windows {list(self.windows)}"
                )
        return self


class ParseSettings(_Section):
    envelope: Literal["auto", "raw"] = Field(
        "auto", description="auto: each record's envelope is detected (Fluent Bit kafka "
        "json with any timestamp_format, msgpack, raw; Fluentd; Docker; CRI; the bare "
        "line). raw: every record is the access-log line itself, for Fluent Bit's "
        "`format raw` of lines that are themselves JSON with a log/message/kubernetes key.")
    log_format: str = Field(
        "auto", description="auto | envoy | istio | istio-legacy | json | an Envoy format string"
    )
    json_keys: dict[str, str] = Field(
        default_factory=dict, description="JSON key -> canonical field."
    )
    unparsed: Literal["index", "dead_letter"] = Field(
        "index", description="Lines no format matches: index them tagged, or dead-letter them."
    )

    @field_validator("log_format")
    @classmethod
    def _format_compiles(cls, v: str) -> str:
        # The parser `run` builds, compiled now: a bad format string fails at load,
        # with the position, instead of when the first batch arrives.
        make_parser(v)
        return v


class LimitsSettings(_Section):
    """What one record may cost: a longer line or field is cut, tagged and counted."""

    max_line_bytes: int = Field(
        64 * 1024, ge=1024, le=64 * 1024 * 1024,
        description="Access-log lines (and event.original) are cut to this many UTF-8 "
                    "bytes before parsing; tagged envoygeo_line_truncated.")
    max_field_bytes: int = Field(
        8 * 1024, ge=256, le=64 * 1024 * 1024,
        description="Each text value parsed from a line is cut to this many UTF-8 bytes; "
                    "tagged envoygeo_field_truncated, named in envoygeo.truncated.")

    @model_validator(mode="after")
    def _field_fits_line(self) -> LimitsSettings:
        if self.max_field_bytes > self.max_line_bytes:
            raise ValueError(f"max_field_bytes ({self.max_field_bytes}) must not exceed "
                             f"max_line_bytes ({self.max_line_bytes})")
        return self


class DocumentSettings(_Section):
    """Which fields access-log documents carry. Elasticsearch spends about a microsecond
    of CPU per field per document on top of a fixed cost, so fields nobody reads are
    what a cluster can save on (README "Leaner documents")."""

    profile: omit_mod.Profile = Field(
        "full", description="full: every field envoygeo knows. lean: without the fields "
        "no dashboard, report or rule reads and a request's story does not need "
        "(constants, shipper bookkeeping, GeoIP below the city, pod identity beyond the "
        "namespace, url.original, related.ip); README lists them.")
    omit: list[str] = Field(
        default_factory=list, description="More fields, or objects (kubernetes), to leave "
        "out; not those the dashboards, the report or the rules read.")

    @field_validator("omit")
    @classmethod
    def _omittable(cls, v: list[str]) -> list[str]:
        refused = omit_mod.refusal(v)
        if refused is not None:
            raise ValueError(refused)
        return v

    def paths(self) -> tuple[str, ...]:
        """Every field left out (the profile's and omit's)."""
        return omit_mod.paths(self.profile, self.omit)


class MetricsSettings(_Section):
    host: str = "0.0.0.0"
    port: int = Field(9108, ge=0, le=65535, description="0 disables the HTTP endpoint.")
    progress_interval_s: float = Field(10.0, gt=0)


class WorkerSettings(_Section):
    shutdown_grace_s: float = Field(30.0, gt=0)
    max_inflight_batches: int = Field(4, ge=1, description="Bounds memory while the sink is slow.")
    backpressure_wait_s: float = Field(
        1.0, gt=0, le=30,
        description="At max_inflight_batches, how long to wait for the oldest bulk "
                    "before pausing the partitions (a sink that is down).")


class KibanaSettings(_Section):
    """Where `envoygeo dashboards import` sends the saved objects and rules (not used
    by the worker). Same auth shape as `elasticsearch`: API key or basic auth, CA."""

    url: str | None = Field(None, description="Kibana / OpenSearch Dashboards base URL.")
    space: str | None = Field(None, description="Kibana space id (default space when unset).")
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    ca_certs: Path | None = None
    verify_certs: bool = True

    @field_validator("api_key_file", "password_file")
    @classmethod
    def _readable(cls, v: Path | None) -> Path | None:
        return check_readable(v)

    @model_validator(mode="after")
    def _credentials(self) -> KibanaSettings:
        _one_of(self, "password", "api_key")
        return self

    def api_key_value(self) -> str | None:
        return secret_value(self.api_key, self.api_key_file)

    def password_value(self) -> str | None:
        return secret_value(self.password, self.password_file)


class ForwardUser(_Section):
    """A username/password a forward client must send in its PING (Fluentd `<user>`,
    Fluent Bit `Username`/`Password`)."""

    username: str = Field(min_length=1)
    password: SecretStr


class ForwardSettings(_Section):
    """`envoygeo forward`: a Fluent Forward protocol v1 server (Fluent Bit's and Fluentd's
    `forward` outputs point at it) that relays every event to Kafka, one record each
    (mode relay), or enriches and indexes the events itself (mode direct, no Kafka).
    The limits bound memory: a chunk over them gets no ack, so the shipper resends it."""

    host: str = "0.0.0.0"
    port: int = Field(24224, ge=0, le=65535, description="TCP port (24224: Fluentd's).")
    mode: Literal["relay", "direct"] = Field(
        "relay", description="relay: produce to Kafka for the workers. direct: enrich and "
                             "index into Elasticsearch in this process, no Kafka (small "
                             "setups: no replay, one process).")
    dead_letter_index: str = Field(
        "envoygeo-dead-letter", min_length=1,
        description="direct mode: Elasticsearch index of the dead letters (unparsable "
                    "lines with parse.unparsed: dead_letter, documents Elasticsearch "
                    "rejects), as the worker's kafka.dead_letter_topic.")
    topic: str | None = Field(
        None, min_length=1, description="Kafka topic relayed to (default: kafka.topics[0], "
                                        "the worker's first topic).")
    shared_key: SecretStr | None = Field(
        None, description="When set, clients must pass the HELO/PING/PONG handshake with "
                          "this key (Fluent Bit/Fluentd `shared_key`).")
    shared_key_file: Path | None = Field(
        None, description="shared_key read from this file (a Kubernetes Secret volume); "
                          "read at start.")
    self_hostname: str | None = Field(
        None, min_length=1, description="Name sent in PONG (default: the host name).")
    max_chunk_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024,
        description="Largest frame accepted, on the wire and after gunzip; a larger one is "
                    "refused (no ack, connection closed).")
    max_inflight_chunks: int = Field(
        64, ge=1, description="Chunks with an ack request waiting for Kafka at once, all "
                              "connections; one more is refused (no ack, connection closed) "
                              "and the shipper resends it.")
    max_connections: int = Field(1024, ge=1)
    metrics_port: int = Field(
        9109, ge=0, le=65535, description="/metrics, /healthz, /readyz on metrics.host "
                                          "(0 disables them).")
    shutdown_grace_s: float = Field(
        30.0, gt=0, description="SIGTERM: how long in-flight chunks get to reach Kafka.")
    udp_heartbeat: bool = Field(
        True, description="Answer Fluentd's `heartbeat_type udp` on the same port (UDP).")
    tag_header: bool = Field(
        False, description="Put each event's tag in a `fluent.tag` Kafka header (Fluent "
                           "Bit's kafka output drops it; measured at ~0.8 µs CPU a record).")
    users: list[ForwardUser] = Field(
        default_factory=list, description="When set (with shared_key), the handshake also "
                                          "asks for one of these usernames and its password.")
    tls_cert_file: Path | None = Field(
        None, description="PEM server certificate (and chain): clients must connect with "
                          "TLS (Fluent Bit `tls on`, Fluentd `transport tls`).")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_ca_file: Path | None = Field(
        None, description="PEM CA certificate(s): clients must present a certificate it "
                          "signed (mutual TLS).")

    @field_validator("shared_key_file")
    @classmethod
    def _readable(cls, v: Path | None) -> Path | None:
        return check_readable(v)

    def shared_key_value(self) -> str | None:
        return secret_value(self.shared_key, self.shared_key_file)

    @model_validator(mode="after")
    def _built(self) -> ForwardSettings:
        _one_of(self, "shared_key")
        if self.mode == "direct" and self.topic is not None:
            raise ValueError("topic is the Kafka topic of mode relay; mode direct indexes "
                             "into elasticsearch.index (remove forward.topic)")
        if self.mode == "direct" and self.tag_header:
            raise ValueError("tag_header is a Kafka header of mode relay; mode direct has "
                             "no Kafka record")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_ca_file (client certificates) needs tls_cert_file")
        if self.users and self.shared_key is None and self.shared_key_file is None:
            raise ValueError("users (username/password) are checked in the shared_key "
                             "handshake: set shared_key too")
        return self


class PolicySettings(_Section):
    """`envoygeo policy`: alerts and IP lists in, Istio AuthorizationPolicy and Envoy
    RBAC out. The list files are read (and so checked, line by line) at start and
    again every round, so editing them takes effect without a restart."""

    source: Literal["elasticsearch", "kafka"] = Field(
        "elasticsearch", description="Where alerts are read: elasticsearch.alerts_index "
                                     "or kafka.alerts_topic (the worker writes both).")
    rules: list[str] = Field(
        default_factory=list, description="Alert rule names that lead to a deny (empty: all).")
    expire_after_s: int = Field(
        3600, ge=1, description="A denied address is released this long after its latest "
                                "alert, unless it alerts again.")
    max_entries: int = Field(
        1000, ge=1, le=100_000,
        description="Most networks denied at once; the smallest offenders (sum of alert "
                    "counts) are cut first, and the cut is reported.")
    allow_files: list[Path] = Field(
        default_factory=list, description="CIDR list files never denied (the allow list wins).")
    deny_files: list[Path] = Field(
        default_factory=list, description="CIDR list files always denied (no expiry, no cut).")
    allow_only: bool = Field(
        False, description="Also deny every client outside the allow list (IP allow-listing).")
    interval_s: float = Field(30.0, gt=0, le=86400, description="Seconds between rounds.")
    envoy_rbac_file: Path | None = Field(
        None, description="Envoy RBAC filter config, loaded by Envoy through ECDS "
                          "(config_discovery with path_config_source).")
    envoy_filter_name: str = Field(
        "envoygeo-rbac", pattern=r"^[A-Za-z0-9_.-]+$",
        description="The HTTP filter's name in Envoy's config (the ECDS resource name).")
    istio_file: Path | None = Field(None, description="AuthorizationPolicy YAML to kubectl apply.")
    istio_name: str = Field("envoygeo", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                            description="Policy name prefix (<name>-deny, <name>-allow).")
    istio_namespace: str = Field("istio-system", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    istio_selector: dict[str, str] = Field(
        default_factory=lambda: {"istio": "ingressgateway"},
        description="matchLabels of the ingress gateway pods.")
    state_file: Path | None = Field(
        None, description="What the last round wrote (default: <first output>.state.json).")
    audit_index: str = Field("envoygeo-policy-audit",
                             description="Elasticsearch index of audit records, one per change.")

    @field_validator("allow_files", "deny_files")
    @classmethod
    def _lists_parse(cls, v: list[Path]) -> list[Path]:
        from pipeline.iplists import IpList

        try:
            IpList.load(v)
        except OSError as exc:
            raise ValueError(f"cannot read {exc.filename}: {exc.strerror}") from None
        return v

    @field_validator("istio_selector")
    @classmethod
    def _selector(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("an empty selector would apply the policy to every workload "
                             "of the namespace; name the gateway's labels")
        return v

    @model_validator(mode="after")
    def _allow_only_needs_list(self) -> PolicySettings:
        if self.allow_only and not self.allow_files:
            raise ValueError("allow_only needs allow_files (it would deny every client)")
        return self


class PluginsSettings(BaseModel):
    """Enrichment plugins (entry points `envoygeo.enrichers`, see pipeline/plugins):
    which run, in order, what happens to a batch one of them fails on, and each one's
    own section `plugins.<name>`, validated at start by the plugin's `Config` model."""

    model_config = ConfigDict(extra="allow")

    enabled: list[str] = Field(
        default_factory=list,
        description="Plugins to run, in order (names of installed entry points).")
    on_error: Literal["index", "dead_letter"] = Field(
        "index",
        description="A batch a plugin failed on (raised, or returned undeclared fields): "
                    "index its records without that plugin's fields, tagged "
                    "envoygeo_plugin_failed (index), or send the whole batch to the "
                    "dead-letter topic (forward direct mode: forward.dead_letter_index) "
                    "with stage plugin and index none of it (dead_letter), for data "
                    "that must not be indexed unenriched.")

    @model_validator(mode="after")
    def _sections(self) -> PluginsSettings:
        from pipeline.plugins import installed

        classes = installed()
        for name in self.enabled:
            if name not in classes:
                raise ValueError(f"plugins.enabled: {name!r} is not an installed enrichment "
                                 f"plugin (installed: {', '.join(sorted(classes)) or 'none'})")
        if len(set(self.enabled)) != len(self.enabled):
            raise ValueError("plugins.enabled: a plugin is listed twice")
        for name, section in (self.model_extra or {}).items():
            cls = classes.get(name)
            if cls is None:
                raise ValueError(f"plugins.{name}: no installed enrichment plugin has this "
                                 f"name (installed: {', '.join(sorted(classes)) or 'none'})")
            try:
                cls.Config.model_validate(section or {})
            except ValidationError as exc:
                why = "; ".join(
                    f"plugins.{name}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                    for e in exc.errors())
                raise ValueError(why) from None
        for name in self.enabled:  # a section-less plugin must accept its defaults
            if name not in (self.model_extra or {}):
                try:
                    classes[name].Config.model_validate({})
                except ValidationError as exc:
                    raise ValueError(f"plugins.{name}: section missing: "
                                     f"{exc.errors()[0]['loc'][0]} is required") from None
        return self

    def sections(self) -> dict[str, Any]:
        """Each plugin's raw section, by name."""
        return dict(self.model_extra or {})


class Settings(BaseModel):
    """Every section; read by `load_settings` (file, ${VAR}, then ENVOYGEO_* variables)."""

    model_config = ConfigDict(extra="forbid")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    elasticsearch: ElasticsearchSettings = Field(default_factory=ElasticsearchSettings)
    geoip: GeoIPSettings = Field(default_factory=GeoIPSettings)
    client_ip: ClientIPSettings = Field(default_factory=ClientIPSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    rates: RatesSettings = Field(default_factory=RatesSettings)
    parse: ParseSettings = Field(default_factory=ParseSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    kibana: KibanaSettings = Field(default_factory=KibanaSettings)
    forward: ForwardSettings = Field(default_factory=ForwardSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    plugins: PluginsSettings = Field(default_factory=PluginsSettings)
    document: DocumentSettings = Field(default_factory=DocumentSettings)


class ConfigError(Exception):
    """A configuration that cannot run; the message names every offending key."""


def load_settings(path: Path | str | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Read the YAML file (optional), expand ${VAR} in it, apply ENVOYGEO_* overrides,
    validate everything; a ConfigError lists every problem, each with its key."""
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded or {}
    data, problems = sources.expand_variables(data, env)
    overrides, env_problems = sources.environment_overrides(Settings, env)
    origins, merge_problems = sources.apply_overrides(data, overrides, Settings)
    problems += env_problems + merge_problems
    problems += sources.coerce_strings(Settings, data)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        # A key whose ${VAR} or JSON was already refused gets no second, derived error.
        said = [key for key, _ in problems]
        problems += [(key, why) for key, why in _pydantic_problems(exc)
                     if not any(key == k or key.startswith(k + ".") for k in said)]
    else:
        if not problems:
            return settings
    raise ConfigError(explain([(_with_origin(key, origins), why) for key, why in problems],
                              path))


def _with_origin(key: str, origins: Mapping[sources.Loc, str]) -> str:
    """`kafka.topics (from ENVOYGEO_KAFKA__TOPICS)` when a variable set the key."""
    by_key = {sources.dotted(loc): name for loc, name in origins.items()}
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        name = by_key.get(".".join(parts[:n]))
        if name is not None:
            return f"{key} (from {name})"
    return key


def describe_validation_error(exc: ValidationError) -> str:
    """A model error raised outside `load_settings` (e.g. from command-line options),
    in the same one-line-per-key form."""
    return explain(_pydantic_problems(exc), header=f"invalid {exc.title} settings:")


def explain(problems: list[sources.Problem], path: Path | str | None = None,
            header: str | None = None) -> str:
    """One line per problem, `key: why`; continuation lines (a format string with a
    caret under the fault) indented below it."""
    origin = f" in {path} or ENVOYGEO_* variables" if path else " in ENVOYGEO_* variables"
    lines = [header or f"invalid configuration{origin}:"]
    seen: set[tuple[str, str]] = set()
    for key, why in problems:
        if (key, why) in seen:
            continue
        seen.add((key, why))
        lines.append(f"  {key}: " + why.replace("\n", "\n    "))
    return "\n".join(lines)


def _pydantic_problems(exc: ValidationError) -> list[sources.Problem]:
    problems: list[sources.Problem] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = sources.dotted(loc)
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if err["type"] == "extra_forbidden":
            model = sources.model_at(Settings, loc[:-1])
            fields = model.model_fields if model is not None else {}
            msg = "unknown key" + (sources.suggest(str(loc[-1]), fields) or (
                f"; known: {', '.join(fields)}" if fields else ""))
        elif not isinstance(err.get("input"), dict | list) and err["type"] not in (
                "value_error", "assertion_error") and not _is_secret(key):
            value = err.get("input")
            shown = repr(url_without_password(value) if isinstance(value, str) else value)
            msg += f" (got {shown[:77] + '...' if len(shown) > 80 else shown})"
        problems.append((key, msg))
    return problems


def _is_secret(key: str) -> bool:
    if key.endswith("_file"):
        return False  # where a secret is (password_file), not the secret
    return key in SECRET_KEYS or "password" in key or "secret" in key


def url_without_password(url: str) -> str:
    """`scheme://user:***@host...`: a password inside a URL (a Redis URL, an
    Elasticsearch host) is as secret as one in its own key."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if password is None:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def masked(settings: Settings) -> dict[str, Any]:
    """The effective configuration with every secret replaced by '***', including
    passwords inside URLs."""
    data = settings.model_dump(mode="json")

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: ("***" if v and _is_secret(k) else walk(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, str) and "://" in node:
            return url_without_password(node)
        return node

    return walk(data)  # type: ignore[no-any-return]
