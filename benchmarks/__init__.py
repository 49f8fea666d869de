"""On-demand benchmarks: ``python -m benchmarks.<name>`` prints figures; nothing here is a test."""
