"""``python -m attamba.train``, failing at once if a DDP wrapper outlives its process group.

A DDP reducer freed after the group is destroyed can deadlock gloo's shutdown (see
:func:`attamba.distributed.shutdown`). The hang shows only by chance; a live wrapper shows always.
"""

import gc
import os
import sys

import torch

from attamba import distributed, train

real_shutdown = distributed.shutdown


def shutdown_with_no_ddp_alive() -> None:
    gc.collect()
    alive = sum(isinstance(obj, torch.nn.parallel.DistributedDataParallel) for obj in gc.get_objects())
    if alive:
        print(f"{alive} DDP wrapper(s) alive when the process group is destroyed", file=sys.stderr, flush=True)
        os._exit(3)  # exiting normally could hang on the very deadlock this probe guards against
    real_shutdown()


distributed.shutdown = shutdown_with_no_ddp_alive
train.main()
