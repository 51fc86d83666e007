"""Settings for every test: one intra-op thread.

The tests run tiny models, often several processes at once (torchrun with gloo);
with a thread pool per process they contend for the machine's cores and run many
times slower. Set before torch starts its pool, and inherited by subprocesses."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
