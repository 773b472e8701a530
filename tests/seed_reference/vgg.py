"""Transcription of the seed's models/cifar/vgg.py (bearpaw/pytorch-classification).

Module names are the seed's, so `state_dict()` keys equal the oracle's (tests/data/seed_state_dicts.json.gz).
"""
import math
import torch.nn as nn


class VGG(nn.Module):
    def __init__(self, features, num_classes=1000):
        super().__init__()
        self.features = features
        self.classifier = nn.Linear(512, num_classes)
        self._initialize_weights()

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        x = self.classifier(x)
        return x

    def _initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2. / n))
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                n = m.weight.size(1)
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()


def make_layers(cfg, batch_norm=False):
    layers = []
    in_channels = 3
    for v in cfg:
        if v == 'M':
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            if batch_norm:
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


cfg = {
    'A': [64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
    'B': [64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
    'D': [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M'],
    'E': [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512, 512, 512, 'M', 512, 512, 512, 512, 'M'],
}


def vgg11(**kwargs): return VGG(make_layers(cfg['A']), **kwargs)
def vgg11_bn(**kwargs): return VGG(make_layers(cfg['A'], batch_norm=True), **kwargs)
def vgg13(**kwargs): return VGG(make_layers(cfg['B']), **kwargs)
def vgg13_bn(**kwargs): return VGG(make_layers(cfg['B'], batch_norm=True), **kwargs)
def vgg16(**kwargs): return VGG(make_layers(cfg['D']), **kwargs)
def vgg16_bn(**kwargs): return VGG(make_layers(cfg['D'], batch_norm=True), **kwargs)
def vgg19(**kwargs): return VGG(make_layers(cfg['E']), **kwargs)
def vgg19_bn(**kwargs): return VGG(make_layers(cfg['E'], batch_norm=True), **kwargs)


BUILDERS = {
    'vgg11': lambda num_classes: vgg11(num_classes=num_classes),
    'vgg11_bn': lambda num_classes: vgg11_bn(num_classes=num_classes),
    'vgg13': lambda num_classes: vgg13(num_classes=num_classes),
    'vgg13_bn': lambda num_classes: vgg13_bn(num_classes=num_classes),
    'vgg16': lambda num_classes: vgg16(num_classes=num_classes),
    'vgg16_bn': lambda num_classes: vgg16_bn(num_classes=num_classes),
    'vgg19': lambda num_classes: vgg19(num_classes=num_classes),
    'vgg19_bn': lambda num_classes: vgg19_bn(num_classes=num_classes),
}
