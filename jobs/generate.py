"""spark-submit entry point: `spark-submit jobs/generate.py [options]` runs `bertxml generate [options]`."""
import sys

from bertxml.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
