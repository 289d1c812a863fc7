"""Speed and memory benchmarks of the four packages, one module per suite; ``scripts/benchmark.py`` (see
``benchmarks.cli``) runs them and writes Markdown tables and JSON. Shared timing helpers: ``benchmarks.common``."""
