"""`python -m fastppo ...` is the `fastppo` command (what torchrun starts: `torchrun
--nproc_per_node N -m fastppo ppo --config ppo.yaml`)."""
import sys

from fastppo.cli import main

sys.exit(main())
