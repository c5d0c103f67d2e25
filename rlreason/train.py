"""Entry point for ``accelerate launch -m rlreason.train CONFIG [key=value ...] [--resume]``."""

import sys

from rlreason.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
