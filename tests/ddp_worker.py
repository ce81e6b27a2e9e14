"""Run ``mtlora.train.train`` on several configs inside ONE process group (launched by the tests).

Starting ``accelerate launch`` costs tens of seconds on a loaded 2-core machine; one launch for all
the compared methods keeps tests/test_distributed.py fast. Each argument is a YAML run config;
``idle:CONFIG`` adds a trainable parameter that never gets a gradient (as a multi-head adapter's
head or router may on some step), which DDP without ``find_unused_parameters`` rejects.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from mtlora.config import load_config
from mtlora.distributed import launched_world_size
from mtlora.train import prepare_run, train

if __name__ == "__main__":
    for arg in sys.argv[1:]:
        idle = arg.startswith("idle:")
        config = load_config(arg.removeprefix("idle:"))
        run = None
        if idle:
            run = prepare_run(config, launched_world_size(), int(os.environ.get("RANK", "0")))
            run.model.idle_head = nn.Parameter(torch.ones(3))
        train(config, overwrite=True, progress=False, run=run)
