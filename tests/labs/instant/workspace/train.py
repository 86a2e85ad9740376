"""A stand-in train.py: its constants define a score surface; STATUS makes the judge report a status."""

LEARNING_RATE = 0.01  # peak learning rate
DEPTH = 2  # blocks
WIDTH = 64  # channels
STATUS = "ok"  # ok | crashed | oom | timeout | invalid | hang | fake
SLEEP = 0.0  # seconds the judge takes, to give tests an experiment in flight
