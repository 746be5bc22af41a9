"""Users' entry points: the ``psepr`` command (later ``svm`` and ``dsmtc``)."""
