"""Parallel topology and collectives: the device mesh of replicas and stages, the replicas' gradient average,
gathers onto the first stage and errors that reach every rank."""
