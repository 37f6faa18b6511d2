"""spark-submit entry point: `spark-submit jobs/tokenize_chunks.py [options]` runs `bertxml tokenize [options]`."""
import sys

from bertxml.cli import main

if __name__ == "__main__":
    sys.exit(main(["tokenize", *sys.argv[1:]]))
