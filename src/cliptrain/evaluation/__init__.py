"""Evaluation of image-text models: retrieval recall/ranks and zero-shot classification.

Both use one tie rule: the rank of the correct item is 1 + the number of candidates scoring
strictly higher than it, so ties count in the correct item's favour.
"""
