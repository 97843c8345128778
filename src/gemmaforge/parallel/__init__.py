"""Parallelism applied from outside the model, on ``torch.distributed``: the layout and mesh (``dims``),
one file per parallelism (``tp``, ``fsdp``, ``cp``, ``pp``, ``ep``), activation checkpointing,
compile, meta-device init, whole state dicts, gradient norms, process plumbing, and ``parallelize``
(the one fixed order)."""
