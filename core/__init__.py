"""The ground layer: what every stage needs and that needs nothing of ours.

Errors, registries, the config loader, device resolution, the stored-row layout, weight and hub
resolution, atomic writes and file digests. Modules here import only the standard library and
third-party packages (checked by import-linter), so any stage can use them without a cycle.
"""
