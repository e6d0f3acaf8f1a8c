"""The run directory, which every stage reads and writes: its layout (and an exported bundle's), atomic
and durable file IO, the manifest and log, stage completion marks, and `--config` run files.

A leaf: it imports nothing of the pipeline, so every stage can use it.
"""
