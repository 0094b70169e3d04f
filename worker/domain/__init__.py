"""The domain's vocabulary and its tables: statuses, delay reasons, error codes, the schema."""
