"""Naive transcriptions of the seed repo's models (bearpaw/pytorch-classification), for function-equivalence tests.

Each module keeps the seed's module names, so its `state_dict()` keys equal the seed's, and exposes
`BUILDERS = {kit_model_name: lambda num_classes: seed_model}`. tests/test_models.py discovers the modules with pkgutil.
"""
