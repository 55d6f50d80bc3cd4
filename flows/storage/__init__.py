"""Byte access: every read and listing of a local or remote object (:mod:`.io`), S3 through
obstore (:mod:`.objstore`)."""
