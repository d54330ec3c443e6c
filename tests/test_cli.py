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
            "nopkg": ("walship_no_such_pkg.cli", "x"),
            "broken": ("walship_cli_probe.broken", "x"),
        },
    )
    ctx = click.Context(main)
    names = main.list_commands(ctx)
    assert "hello" in names and "broken" in names
    assert "absent" not in names and "nopkg" not in names
    assert run("hello") == (0, "hi\n", "")
    assert main.get_command(ctx, "absent") is None
    with pytest.raises(ModuleNotFoundError, match="walship_no_such_dependency"):
        main.get_command(ctx, "broken")


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
