"""walship: replicate a write-ahead log through Kafka."""
