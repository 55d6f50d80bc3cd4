"""Per-sample stages: each module holds one concern (generic stages, reading, audio, tensors,
the cache) and :mod:`.collate` the collation of a batch."""
