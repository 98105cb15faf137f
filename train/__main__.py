"""`python -m train RECIPE ...` / `torchrun --nproc_per_node N -m train RECIPE ...` == `kakehashi train RECIPE ...`."""

import sys

from train.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
