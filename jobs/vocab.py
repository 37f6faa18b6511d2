"""spark-submit entry point: `spark-submit jobs/vocab.py [options]` runs `bertxml vocab [options]`."""
import sys

from bertxml.cli import main

if __name__ == "__main__":
    sys.exit(main(["vocab", *sys.argv[1:]]))
