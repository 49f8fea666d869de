"""Data: raw Vimeo-90k (download or the built-in sample) → Parquet shards → HiFiC I-frames,
and the readers that feed training and evaluation."""
