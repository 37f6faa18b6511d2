"""spark-submit entry point: `spark-submit jobs/etl.py [options]` runs `bertxml etl [options]`."""
import sys

from bertxml.cli import main

if __name__ == "__main__":
    sys.exit(main(["etl", *sys.argv[1:]]))
