"""spark-submit entry point: `spark-submit jobs/pretrain.py [options]` runs `bertxml pretrain [options]`."""
import sys

from bertxml.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
