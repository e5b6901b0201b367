"""The offline wing: one module per DVC stage, each with one typed entry function `run`."""
