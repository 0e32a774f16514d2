"""Programs that every process of a job runs (chapter 10); :func:`llmbook.distributed.launch` starts them.

Each takes ``--out FILE``: rank 0 writes its result there with ``torch.save``.
"""
