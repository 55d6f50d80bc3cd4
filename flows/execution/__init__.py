"""What the Workers node runs on: a task's work (:mod:`.apply`), the pools of threads or processes
(:mod:`.pools`), shared memory between processes (:mod:`.shared_memory`) and thread counts
(:mod:`.threads`)."""
