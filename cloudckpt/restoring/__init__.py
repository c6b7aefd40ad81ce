"""Restoring a checkpoint: the mirror of ``cloudckpt.saving``.

Internal: not a public path (docs/architecture.md lists those), so it may move between releases.

Modules, in the order a restore uses them: ``io_host`` (the index every rank shares, and
with ``experimental_io_device`` the io host fetching every rank's bytes), ``assign``
(match the index's entries to live objects, validate, then assign; ``RestoreSession``),
``buffers`` (what a read fills, and the size checks before allocating one),
``array_reads`` (ranged reads straight into those buffers, each chunk's CRC32C verified),
``load_status`` (the status objects ``Checkpoint.restore`` returns) and
``checkpoint_reader`` (reading without restoring: ``CheckpointReader``, ``load_variable``,
``list_variables``).
"""
