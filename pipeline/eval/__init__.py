"""Evaluation: test sets, real bitstreams of the trained models, metrics, x264/x265 anchors,
RD curves, BD-rates and the report."""
