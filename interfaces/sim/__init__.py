"""Research simulators (outside the processing path): study generators with known truth."""
