"""Training: the Trainer loop over a Task, the run directory, and the end-to-end recipe."""
