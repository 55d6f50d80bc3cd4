"""The training side of flows: the loop, checkpoints, metric logs, tasks and models, the
distributed set-up, the recipe registry, and the CLI, inspection and demo around them. It uses
the pipeline (:mod:`flows`); the pipeline never imports it."""
