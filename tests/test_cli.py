"""The walship command: exit codes, config show, lazy registration."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from walship.shared.cli import main as main_module
from walship.shared.cli.main import main
from walship.shared.cli.options import settings_from
from walship.shared.errors import ConfigError, WalshipError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("WALSHIP_"):
            monkeypatch.delenv(name)


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_version_and_help() -> None:
    code, out, _ = run("--version")
    assert code == 0 and out.startswith("walship, version ")
    code, out, _ = run("--help")
    assert code == 0 and "config" in out


def test_config_show_precedence_and_sources(tmp_path: Path) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text('[topic]\nname = "orders"\n')
    code, out, _ = run(
        "config",
        "show",
        "--json",
        "--config",
        str(cfg),
        "--partitions",
        "3",
        env={"WALSHIP_KAFKA__BOOTSTRAP_SERVERS": "k1:9092,k2:9092"},
    )
    assert code == 0
    data = json.loads(out)
    assert data["settings"]["topic"] == {
        **data["settings"]["topic"],
        "name": "orders",
        "partitions": 3,
    }
    assert data["settings"]["kafka"]["bootstrap_servers"] == "k1:9092,k2:9092"
    assert data["sources"]["topic.partitions"] == "flag --partitions"
    assert data["sources"]["topic.name"] == f"file {cfg}"
    assert data["sources"]["kafka.bootstrap_servers"] == "env WALSHIP_KAFKA__BOOTSTRAP_SERVERS"
    assert data["sources"]["data_dir"] == "default"


def test_config_show_text_masks_secrets() -> None:
    code, out, _ = run(
        "config",
        "show",
        env={
            "WALSHIP_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "WALSHIP_KAFKA__SASL_MECHANISM": "PLAIN",
            "WALSHIP_KAFKA__SASL_USERNAME": "svc",
            "WALSHIP_KAFKA__SASL_PASSWORD": "hunter2",
        },
    )
    assert code == 0
    assert "hunter2" not in out
    line = next(x for x in out.splitlines() if x.startswith("kafka.sasl_password"))
    assert '"**********"' in line and "env WALSHIP_KAFKA__SASL_PASSWORD" in line


def test_bad_settings_exit_2_naming_the_setting() -> None:
    code, out, err = run("config", "show", "--bootstrap-servers", "localhost", "--partitions", "0")
    assert code == 2 and out == ""
    assert "Traceback" not in err
    assert "kafka.bootstrap_servers = 'localhost' (from flag --bootstrap-servers" in err
    assert "has no port" in err
    assert "topic.partitions = 0 (from flag --partitions" in err
    code, _, err = run("config", "show", env={"WALSHIP_TOPIC__PARTITIONS": "0"})
    assert code == 2 and "topic.partitions = '0' (from env WALSHIP_TOPIC__PARTITIONS)" in err


def test_usage_error_exit_2() -> None:
    code, _, err = run("config", "show", "--partitions", "many")
    assert code == 2 and "many" in err
    code, _, _ = run("no-such-command")
    assert code == 2


def test_walship_errors_exit_1_without_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    @click.command("boom")
    @click.option("--kind", type=click.Choice(["walship", "config"]))
    def boom(kind: str) -> None:
        if kind == "config":
            raise ConfigError("setting x is wrong")
        raise WalshipError("the broker said no", topic="t", partition=3)

    main.add_command(boom)
    try:
        code, _, err = run("boom", "--kind", "walship")
        assert code == 1
        assert err.strip() == "Error: the broker said no (topic=t, partition=3)"
        code, _, err = run("boom", "--kind", "config")
        assert code == 2 and "setting x is wrong" in err
    finally:
        main.commands.pop("boom")


def test_other_exceptions_are_not_hidden() -> None:
    @click.command("bug")
    def bug() -> None:
        raise KeyError("a bug")

    main.add_command(bug)
    try:
        with pytest.raises(KeyError):
            run("bug")
    finally:
        main.commands.pop("bug")


def test_lazy_registration_skips_missing_modules_but_raises_on_broken(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pkg = tmp_path / "walship_cli_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text(
        "import click\n@click.command()\ndef hello_cmd() -> None:\n    click.echo('hi')\n"
    )
    (pkg / "broken.py").write_text("import walship_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(
        main_module,
        "_OPTIONAL",
        {
            "hello": ("walship_cli_probe.good", "hello_cmd"),
            "absent": ("walship_cli_probe.absent", "x"),
            "noattr": ("walship_cli_probe.good", "not_written_yet"),
            "notcmd": ("walship_cli_probe.good", "click"),
            "nopkg": ("walship_no_such_pkg.cli", "x"),
            "broken": ("walship_cli_probe.broken", "x"),
        },
    )
    ctx = click.Context(main)
    # --help must not hide a broken module or a wrong attribute.
    with pytest.raises((ModuleNotFoundError, RuntimeError)):
        main.list_commands(ctx)
    probe = dict(main_module._OPTIONAL)
    for name in ("broken", "notcmd"):
        del main_module._OPTIONAL[name]
    names = main.list_commands(ctx)
    main_module._OPTIONAL.update(probe)
    assert "hello" in names
    assert "absent" not in names and "nopkg" not in names and "noattr" not in names
    assert run("hello") == (0, "hi\n", "")
    assert main.get_command(ctx, "absent") is None
    with pytest.raises(ModuleNotFoundError, match="walship_no_such_dependency"):
        main.get_command(ctx, "broken")
    with pytest.raises(RuntimeError, match="not a click command"):
        main.get_command(ctx, "notcmd")


def test_settings_from_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WALSHIP_TOPIC__NAME", "env-topic")
    s = settings_from(bootstrap_servers="b:1", topic=None, partitions=2, config=None)
    assert s.kafka.bootstrap_servers == "b:1"
    assert s.topic.name == "env-topic"  # None does not override
    assert s.topic.partitions == 2
    assert settings_from(consumer__http_port=8081).consumer.http_port == 8081
    with pytest.raises(TypeError, match="as_json"):
        settings_from(as_json=True)


# --- walship devcluster ---------------------------------------------------------


def _start_devcluster(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "walship.shared.cli.main", "devcluster", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("WALSHIP_")},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"devcluster printed no bootstrap servers: {err}")
    return proc, line


async def _roundtrip(bootstrap: str, topic: str) -> tuple[int, list[bytes]]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for i in range(3):
            await producer.send_and_wait(topic, b"m%d" % i, partition=1)
    finally:
        await producer.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    values: list[bytes] = []
    try:
        tp = TopicPartition(topic, 1)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        async with asyncio.timeout(10):
            while len(values) < 3:
                got = await consumer.getmany(tp, timeout_ms=1000)
                values += [m.value for m in got.get(tp, [])]
    finally:
        await consumer.stop()
    return len(described["partitions"]), values


@pytest.mark.kafka
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
async def test_devcluster_serves_kafka_until_signalled(stop_signal: signal.Signals) -> None:
    proc, bootstrap = _start_devcluster(
        "--brokers", "2", "--topic", "a", "--topic", "b", "--partitions", "1", "--partitions", "4"
    )
    try:
        servers = bootstrap.split(",")
        assert len(servers) == 2 and all(s.startswith("127.0.0.1:") for s in servers)
        count, values = await _roundtrip(bootstrap, "b")
        assert count == 4 and values == [b"m0", b"m1", b"m2"]
        proc.send_signal(stop_signal)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "dev cluster stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_devcluster_rejects_mismatched_partition_counts() -> None:
    code, _, err = run(
        "devcluster",
        "--topic",
        "a",
        "--topic",
        "b",
        "--topic",
        "c",
        "--partitions",
        "1",
        "--partitions",
        "2",
    )
    assert code == 2 and "one per --topic" in err
    code, _, err = run("devcluster", "--topic", "bad topic", "--partitions", "1")
    assert code == 2 and "--topic" in err
    code, _, err = run("devcluster", "--brokers", "0")
    assert code == 2


# --- walship verify -----------------------------------------------------------


def _store(path: Path, pairs: list[tuple[bytes, bytes]], deletes: tuple[bytes, ...] = ()) -> Path:
    """A store at seq len(pairs) + len(deletes) holding ``pairs`` minus ``deletes``."""
    from walship.shared.model import Batch, Op, WriterId
    from walship.shared.store import ReplicaStore

    ops = [(Op.PUT, k, v) for k, v in pairs] + [(Op.DELETE, k, b"") for k in deletes]
    batch = Batch(
        writer=WriterId(b"\x01" * 16, 1),
        first_seq=1,
        ops=bytes(op for op, _, _ in ops),
        keys=[k for _, k, _ in ops],
        values=[v for _, _, v in ops],
        txn_sizes=[len(ops)],
        txn_timestamps_us=[1],
    )
    path.mkdir(parents=True, exist_ok=True)
    with ReplicaStore(path / "state.db") as store:
        store.apply([batch])
    return path


def test_verify_equal_stores(tmp_path: Path) -> None:
    a = _store(tmp_path / "a", [(b"k1", b"v1"), (b"k2", b"v2")])
    # Same state at the same seq, reached differently.
    b = _store(tmp_path / "b", [(b"k2", b"v2"), (b"k1", b"v1")])
    code, out, _ = run("verify", str(a), str(b / "state.db"))
    assert code == 0, out
    assert out.splitlines()[-1] == "EQUAL at seq 2"
    assert out.count("seq=2 keys=2 sha256=") == 2
    code, out, _ = run("verify", "--json", str(a), str(b))
    data = json.loads(out)
    assert code == 0 and data["equal"] is True and data["differences"] == []
    assert data["a"]["sha256"] == data["b"]["sha256"] and data["a"]["path"] == str(a / "state.db")


def test_verify_different_stores(tmp_path: Path) -> None:
    a = _store(tmp_path / "a", [(b"k1", b"v1"), (b"k2", b"v2")])
    b = _store(tmp_path / "b", [(b"k1", b"v1"), (b"k2", b"XX")])
    code, out, _ = run("verify", str(a), str(b))
    assert code == 1
    assert "DIFFERENT: sha256" in out and "seq" not in out.splitlines()[-1]
    # Same keys and content at different seqs are not equal either.
    c = _store(tmp_path / "c", [(b"k1", b"v1"), (b"k2", b"v2"), (b"k3", b"v3")], (b"k3",))
    code, out, _ = run("verify", "--json", str(a), str(c))
    data = json.loads(out)
    assert code == 1 and data["equal"] is False
    assert data["a"]["sha256"] == data["b"]["sha256"]
    assert [d.split()[0] for d in data["differences"]] == ["seq"]
    d = _store(tmp_path / "d", [(b"k1", b"v1")])
    code, out, _ = run("verify", str(a), str(d))
    assert code == 1 and "seq 2 != 1" in out and "keys 2 != 1" in out


def test_verify_bad_paths(tmp_path: Path) -> None:
    a = _store(tmp_path / "a", [(b"k", b"v")])
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run("verify", str(a), str(empty))
    assert code == 2 and "no state.db" in err
    code, _, _ = run("verify", str(a), str(tmp_path / "absent"))
    assert code == 2
    not_a_store = tmp_path / "junk.db"
    not_a_store.write_bytes(b"this is not sqlite" * 100)
    code, _, err = run("verify", str(a), str(not_a_store))
    assert code == 1 and "Traceback" not in err and str(not_a_store) in err
