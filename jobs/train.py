"""spark-submit entry point: `spark-submit jobs/train.py [options]` runs `bertxml train [options]`."""
import sys

from bertxml.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
