"""The `livefuse` command line: the parser and dispatcher in `livefuse.cli.main`, one module
per command beside it (models, swap, bench, clip, serve).

The top layer: it may import `web`, `stream` and `engines`; nothing imports it. It is also
the only layer that reaches `livefuse.engines.fetch` (model downloads, `livefuse models pull`).
"""
