"""The engine: one stage's part of any schedule, with no Lightning in it. The executor interprets a schedule's
actions over this stage's layers; beside it, the links to the neighbouring stages, micro-batching,
re-materialization (recompute), random streams, skip connections and batch norm across micro-batches."""
