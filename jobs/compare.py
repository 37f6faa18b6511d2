"""spark-submit entry point: `spark-submit jobs/compare.py [options]` runs `bertxml compare [options]`."""
import sys

from bertxml.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
