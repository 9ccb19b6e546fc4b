"""The Hugging Face layer: models and tokenizers, chat templates, datasets, batching, generation and SFT.

It sits above :mod:`bft.loss` and below decoding, analysis, eval, the trainer and the pipelines; it imports
nothing of those.
"""
