"""Evaluation of image-text models: retrieval recall/ranks, zero-shot classification and linear probes,
on the run's validation data or on datasets given as files (see docs/evaluation.md).

Every metric uses one tie rule: the rank of the correct item is 1 + the number of candidates scoring
strictly higher than it, so ties count in the correct item's favour.
"""
