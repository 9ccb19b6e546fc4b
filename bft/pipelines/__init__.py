"""Pipelines: end-to-end experiments built from every layer below (the miniature reproduction and its recipes).

- :mod:`.refusal_sft` — the shallow refusal SFT that makes the reproduction's aligned model;
- :mod:`.reproduce` — the paper in miniature: config, stages, summary, report.
"""
