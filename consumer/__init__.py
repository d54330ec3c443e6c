"""walship: replicate a write-ahead log through Kafka."""

from walship.consumer.replica import Replica

__all__ = ["Replica"]
