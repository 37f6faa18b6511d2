"""spark-submit entry point: `spark-submit jobs/retrain.py [options]` runs `bertxml retrain [options]`."""
import sys

from bertxml.cli import main

if __name__ == "__main__":
    sys.exit(main(["retrain", *sys.argv[1:]]))
