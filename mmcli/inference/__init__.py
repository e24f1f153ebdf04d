"""Applying a trained model to the user's data and writing what it produces: captions (``captions``).

A stage of the rank of ``retrieval`` and ``evaluation``; it reads its inputs with the retrieval
stage's loaders, so that ``mmcli caption`` accepts what ``mmcli embed`` accepts.
"""
