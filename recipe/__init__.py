"""The pieces of `train.py`'s recipe that are not the loop itself: the counters and seeds of a run,
building the roles (text encoder, DiTs) across ranks, optimizers and LR schedules, data, resume, the
stop policy and sample videos. `train.py` reads top to bottom as set-up, step, checkpoint/stop policy
and calls these. An entry-point layer: it may import every folder but `world/`; nothing imports it
except the entry points."""
