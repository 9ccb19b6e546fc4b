"""bft inside other training frameworks. :mod:`bft.integrations.trl`: BFT as a TRL trainer (``pip install
'bft[trl]'``). This package sits at the trainer's layer: it imports :mod:`bft.trainer`, never the reverse."""
