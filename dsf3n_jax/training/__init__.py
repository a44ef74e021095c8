"""Training by concern: state and optimiser, steps, run setup, workdir files, loop, restore."""
