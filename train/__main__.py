"""`python -m train RECIPE ...` / `torchrun --nproc_per_node N -m train RECIPE ...` == `kakehashi train RECIPE ...`.

Any other `kakehashi` command works too: `python -m train recipe check RECIPE`.
"""

import sys

from train.cli import build_parser, main

commands = build_parser()._subparsers._group_actions[0].choices
args = sys.argv[1:]
sys.exit(main(args if args and args[0] in commands else ["train", *args]))
