"""`torch.hub.load(REPO_OR_DIR, 'wrn28_10', pretrained=...)`: every registered model of cifar_kit as a torch.hub entry point.

`pretrained` takes what `cifar_kit.create_model` takes: a folder written by `cifar-kit export`, a Hugging Face Hub id,
or 'torchvision' for the torchvision-backed ImageNet models; without it the model is freshly initialised."""
dependencies = ['torch']   # torch.hub checks these are importable before it loads anything else here

import cifar_kit   # the package face: registers every model (and lets torchvision import on a CPU-only torch)
from cifar_kit.core import MODELS, create_model as _create_model   # private: torch.hub lists the public callables


def _entry(name:str):
    "The entry point of registered model `name`"
    def entry(pretrained=None, **kwargs): return _create_model(name, pretrained=pretrained, **kwargs)
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"cifar_kit's {name} (pretrained: an exported folder, a Hugging Face Hub id, or None for fresh weights)"
    return entry

globals().update({name: _entry(name) for name in MODELS})   # generated from the registry: a new model needs no edit here
