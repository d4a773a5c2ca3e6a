"""YAML presets (package data): ``pipelines/``, ``rerankers/``, ``train/``."""
