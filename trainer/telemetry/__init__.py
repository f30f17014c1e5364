"""Telemetry: MLflow tracking (rank 0) and the Prometheus exporter (every rank)."""
