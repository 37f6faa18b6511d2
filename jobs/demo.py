"""spark-submit entry point: `spark-submit jobs/demo.py [options]` runs `bertxml demo [options]`."""
import sys

from bertxml.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
