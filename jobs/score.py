"""spark-submit entry point: `spark-submit jobs/score.py [options]` runs `bertxml score [options]`."""
import sys

from bertxml.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
