"""Settings: precedence, validation messages, secrets, aiokafka kwargs."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from walship.shared.errors import ConfigError
from walship.shared.settings import (
    SECRET_MASK,
    KafkaConnection,
    WalshipSettings,
    check_topic_name,
    env_var_name,
    iter_fields,
    load_settings,
    load_settings_from,
    parse_bootstrap_servers,
    setting_sources,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see only the WALSHIP_ variables they set themselves."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("WALSHIP_"):
            monkeypatch.delenv(name)


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "walship.toml"
    path.write_text(text)
    return path


def _problems(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return str(exc.value).splitlines()[1:]


def test_defaults() -> None:
    s = load_settings()
    assert s.kafka.bootstrap_servers == "localhost:9092"
    assert s.topic.name == "walship" and s.topic.partitions == 6
    assert s.producer.fsync == "batch"
    assert s.consumer.bootstrap_policy == "when_needed"
    assert s.snapshot_url is None


def test_precedence_override_env_file_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _toml(
        tmp_path,
        '[topic]\nname = "from-file"\npartitions = 2\nreplication_factor = 1\n'
        '[kafka]\nbootstrap_servers = "file:1"\n',
    )
    monkeypatch.setenv("WALSHIP_TOPIC__PARTITIONS", "4")
    monkeypatch.setenv("WALSHIP_KAFKA__BOOTSTRAP_SERVERS", "env:1")
    s = load_settings(cfg, kafka__bootstrap_servers="flag:1")
    assert s.kafka.bootstrap_servers == "flag:1"  # override beats env and file
    assert s.topic.partitions == 4  # env beats file
    assert s.topic.name == "from-file"  # file beats default
    assert s.topic.replication_factor == 1
    assert s.topic.retention_ms is None  # default
    sources = setting_sources(
        cfg, {"kafka.bootstrap_servers": "flag:1"}, {"kafka.bootstrap_servers": "--bs"}
    )
    assert sources["kafka.bootstrap_servers"] == "flag --bs"
    assert sources["topic.partitions"] == "env WALSHIP_TOPIC__PARTITIONS"
    assert sources["topic.name"] == f"file {cfg}"
    assert sources["topic.retention_ms"] == "default"


def test_config_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _toml(tmp_path, 'data_dir = "/srv/walship"\nsnapshot_url = "kafka://snaps"\n')
    monkeypatch.setenv("WALSHIP_CONFIG", str(cfg))
    s = load_settings()
    assert s.data_dir == Path("/srv/walship") and s.snapshot_url == "kafka://snaps"
    # The explicit file wins over WALSHIP_CONFIG.
    other = tmp_path / "other.toml"
    other.write_text('data_dir = "/other"\n')
    assert load_settings(other).data_dir == Path("/other")


def test_missing_and_broken_config_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.toml")
    monkeypatch.setenv("WALSHIP_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigError, match="WALSHIP_CONFIG"):
        load_settings()
    monkeypatch.delenv("WALSHIP_CONFIG")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(_toml(tmp_path, "[topic\n"))


def test_every_problem_one_line_with_name_env_value_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _toml(tmp_path, '[topic]\nname = "bad name!"\n[producer]\nlinger_ms = -1\n')
    monkeypatch.setenv("WALSHIP_PRODUCER__FSYNC", "never")
    with pytest.raises(ConfigError) as exc:
        load_settings_from(
            cfg,
            {"kafka.bootstrap_servers": "localhost", "topic.partitions": 0},
            {"kafka.bootstrap_servers": "--bootstrap-servers", "topic.partitions": "--partitions"},
        )
    lines = _problems(exc)
    assert str(exc.value).startswith("invalid settings (5 problems):")
    assert len(lines) == 5
    by_name = {line.split()[0]: line for line in lines}
    servers = by_name["kafka.bootstrap_servers"]
    assert "'localhost'" in servers and "flag --bootstrap-servers" in servers
    assert "WALSHIP_KAFKA__BOOTSTRAP_SERVERS" in servers and "has no port" in servers
    partitions = by_name["topic.partitions"]
    assert "= 0" in partitions and "greater than or equal to 1" in partitions
    assert f"file {cfg}" in by_name["topic.name"]
    assert "'bad name!'" in by_name["topic.name"]
    assert "env WALSHIP_PRODUCER__FSYNC" in by_name["producer.fsync"]
    assert "'always', 'batch' or 'interval'" in by_name["producer.fsync"]
    assert "producer.linger_ms" in by_name


def test_unknown_setting_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(_toml(tmp_path, "[kafka]\nbootstrap_server = 'a:1'\n"))
    assert "kafka.bootstrap_server" in str(exc.value)
    assert "not a walship setting" in str(exc.value)


@pytest.mark.parametrize(
    ("value", "servers"),
    [
        ("a:1", [("a", 1)]),
        (" a:1 , b.example.com:9093", [("a", 1), ("b.example.com", 9093)]),
        ("[::1]:9092", [("::1", 9092)]),
    ],
)
def test_bootstrap_servers_valid(value: str, servers: list[tuple[str, int]]) -> None:
    assert parse_bootstrap_servers(value) == servers
    assert KafkaConnection(bootstrap_servers=value).servers == servers


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("localhost", "has no port"),
        ("a:1,", "empty server"),
        (":9092", "no valid host"),
        ("a:0", "invalid port"),
        ("a:70000", "invalid port"),
        ("a:x", "invalid port"),
        ("::1:9092", "no valid host"),
        ("[::1]", "has no port"),
        ("[nope]:1", "not an IPv6 address"),
    ],
)
def test_bootstrap_servers_invalid(value: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_bootstrap_servers(value)
    with pytest.raises(ConfigError, match=r"kafka\.bootstrap_servers"):
        load_settings(kafka__bootstrap_servers=value)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("walship", True),
        ("a.b_c-D9", True),
        ("x" * 249, True),
        ("x" * 250, False),
        ("", False),
        (".", False),
        ("..", False),
        ("a b", False),
        ("a/b", False),
        ("tópico", False),
    ],
)
def test_topic_names(name: str, ok: bool) -> None:
    if ok:
        assert check_topic_name(name) == name
        assert load_settings(topic__name=name).topic.name == name
    else:
        with pytest.raises(ConfigError, match=r"topic\.name"):
            load_settings(topic__name=name)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"topic__partitions": 0}, "topic.partitions = 0"),
        ({"topic__replication_factor": 0}, "topic.replication_factor = 0"),
        ({"topic__min_insync_replicas": 4}, "topic.min_insync_replicas = 4"),
        ({"snapshot_url": "s3://bucket"}, "file:// or kafka://"),
        ({"snapshot_url": "file://relative"}, "file:///absolute"),
        ({"snapshot_url": "kafka://bad topic"}, "snapshot_url"),
        ({"consumer__reader_id": "a b"}, "consumer.reader_id = 'a b'"),
        ({"consumer__replica_synchronous": "extra"}, "consumer.replica_synchronous"),
        ({"consumer__bootstrap_policy": "always"}, "consumer.bootstrap_policy"),
        ({"producer__http_port": 70000}, "producer.http_port = 70000"),
        ({"producer__wal_bytes_max": 8192}, "producer.wal_bytes_max = 8192"),
        (
            {"topic__max_message_bytes": 100_000},
            "producer.message_bytes_max = 900000 (from default",
        ),
        ({"kafka__security_protocol": "SASL_SSL"}, "kafka.sasl_mechanism"),
        ({"kafka__sasl_mechanism": "PLAIN"}, "kafka.sasl_mechanism = 'PLAIN'"),
        ({"kafka__ssl_cafile": "/does/not/exist"}, "kafka.ssl_cafile"),
    ],
)
def test_invalid_values_name_the_setting(overrides: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(**overrides)
    assert needle in str(exc.value)


def test_valid_snapshot_urls() -> None:
    assert load_settings(snapshot_url="file:///var/snaps").snapshot_url == "file:///var/snaps"
    assert load_settings(snapshot_url="kafka://walship.snapshots").snapshot_url


def test_secrets_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WALSHIP_KAFKA__SASL_PASSWORD", "hunter2")
    s = load_settings(
        kafka__security_protocol="SASL_PLAINTEXT",
        kafka__sasl_mechanism="SCRAM-SHA-512",
        kafka__sasl_username="svc",
    )
    assert "hunter2" not in repr(s) and "hunter2" not in str(s)
    assert "hunter2" not in s.model_dump_json()
    assert s.kafka.sasl_password is not None
    assert s.kafka.sasl_password.get_secret_value() == "hunter2"
    # Invalid settings: the error names the setting but masks the password.
    with pytest.raises(ConfigError) as exc:
        load_settings(kafka__sasl_password="hunter2", kafka__security_protocol="NOPE")
    assert "hunter2" not in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_settings(kafka__sasl_password=1234567)  # wrong type: the value is still masked
    assert f"kafka.sasl_password = {SECRET_MASK}" in str(exc.value)
    assert "1234567" not in str(exc.value)
    monkeypatch.setenv("WALSHIP_KAFKA__SASL_PASSWORD", "")  # empty = unset
    with pytest.raises(ConfigError) as exc:
        load_settings(kafka__security_protocol="SASL_SSL")
    assert "hunter2" not in str(exc.value)


def test_aiokafka_kwargs_plaintext_and_sasl(tmp_path: Path) -> None:
    plain = KafkaConnection(bootstrap_servers="a:1", client_id="me").aiokafka_kwargs()
    assert plain == {
        "bootstrap_servers": "a:1",
        "client_id": "me",
        "security_protocol": "PLAINTEXT",
    }
    conn = KafkaConnection(
        bootstrap_servers="a:1",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="u",
        sasl_password="p",  # type: ignore[arg-type]
    )
    kwargs = conn.aiokafka_kwargs()
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-256"
    assert kwargs["sasl_plain_username"] == "u" and kwargs["sasl_plain_password"] == "p"
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)
    assert "'p'" not in repr(conn) and "SecretStr('**********')" in repr(conn)


def test_tls_files_need_a_tls_protocol_and_pairs(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match=r"kafka\.ssl_certfile .*use SSL or SASL_SSL"):
        load_settings(kafka__ssl_certfile=str(cert))
    with pytest.raises(ConfigError, match=r"kafka\.ssl_keyfile .*both"):
        load_settings(kafka__ssl_certfile=str(cert), kafka__security_protocol="SSL")


def test_env_var_names_and_nested_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert env_var_name("kafka.bootstrap_servers") == "WALSHIP_KAFKA__BOOTSTRAP_SERVERS"
    monkeypatch.setenv("walship_consumer__reader_id", "r-7")  # case-insensitive
    monkeypatch.setenv("WALSHIP_TOPIC__RETENTION_MS", "null")
    monkeypatch.setenv("WALSHIP_DATA_DIR", "/d")
    s = WalshipSettings()
    assert s.consumer.reader_id == "r-7" and s.topic.retention_ms is None
    assert s.data_dir == Path("/d")


def test_unparsable_env_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WALSHIP_KAFKA", "{not json")
    with pytest.raises(ConfigError, match="invalid settings"):
        load_settings()


def _generator() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "gen_config_reference.py"
    spec = importlib.util.spec_from_file_location("gen_config_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_config_reference_is_current() -> None:
    gen = _generator()
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text()
    start = text.index(gen.START) + len(gen.START) + 1
    end = text.index(gen.END)
    assert text[start:end] == gen.render(), (
        "README.md's configuration reference is stale: run python scripts/gen_config_reference.py"
    )


def test_reference_lists_every_setting_once() -> None:
    table: str = _generator().render()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    names = [row.split("`")[1] for row in rows]
    assert len(names) == len(set(names)) == len(list(iter_fields()))
    assert (
        "| `kafka.sasl_password` | `WALSHIP_KAFKA__SASL_PASSWORD` | secret string or unset |"
        in table
    )
    assert (
        "| `producer.fsync` | `WALSHIP_PRODUCER__FSYNC` | `always` \\| `batch` \\| `interval` | `batch` |"
        in table
    )
