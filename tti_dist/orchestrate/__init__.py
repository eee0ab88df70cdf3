"""Running sweeps and jobs on a Ray cluster."""
