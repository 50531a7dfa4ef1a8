"""The main job: run config, run directory, the stage chains of LIDR and ICR, the runner, the report."""
