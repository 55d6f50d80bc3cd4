"""Epoch order (:mod:`.order`) and batch plans (:mod:`.plans`): which samples, in which order, in
which global batch; pure functions of (seed, epoch), no sample read."""
