"""Trainer loop, checkpoint/resume, engine construction, local multi-rank launcher."""
