"""spark-submit entry point: `spark-submit jobs/evaluate.py [options]` runs `bertxml evaluate [options]`."""
import sys

from bertxml.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
