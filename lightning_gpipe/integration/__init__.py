"""Lightning integration: the only layer that imports ``lightning.pytorch``. The strategy's hooks, its options and
run state, the user's step around the pipeline, the contract with user code, shared logs, reports and checkpoints."""
