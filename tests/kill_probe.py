"""``python -m attamba.train`` that dies by SIGKILL right after writing checkpoint ``ATTAMBA_KILL_AFTER_CHECKPOINT``:
a ``kill -9`` at an exact point of a real run (after the checkpoint is complete, before anything else happens)."""

import os
import signal

from attamba import checkpoint, train

kill_after = int(os.environ["ATTAMBA_KILL_AFTER_CHECKPOINT"])
real_save = checkpoint.save


def save_then_die(directory, step, state, tokenizer=None):
    path = real_save(directory, step, state, tokenizer=tokenizer)
    if step == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    return path


checkpoint.save = save_then_die
train.main()
