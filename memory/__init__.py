"""Projections of the event log: pure folds from events to run state, results and memory."""
