import click


@click.group()
def main() -> None:
    """walship: replicate a write-ahead log through Kafka to read replicas."""
