"""What every part stands on: configuration, database, logs, encryption, servers, metrics."""
