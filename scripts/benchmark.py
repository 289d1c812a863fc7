"""Speed and memory benchmarks: ``python scripts/benchmark.py --help`` lists the suites (``benchmarks.cli``)."""

from benchmarks.cli import main

if __name__ == "__main__":
    main()
