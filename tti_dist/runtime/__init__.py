"""Processes: the local launcher (torch's elastic agent), one rank's session (logging,
device, process groups, teardown) and the stop request a signal leaves for the trainer.

Shared by every command that runs ranks (train, eval, sae fit, inspect) and by Ray trials.
"""
