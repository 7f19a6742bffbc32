"""The model zoo: output shapes, the papers' parameter counts, factory errors."""
import pytest
import torch

from natasha_ext import models


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", sorted(models.MODELS))
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_shapes(name, channels, size):
    kw = {"widths": (32,), "code": 4} if name == "autoencoder" else {}
    m = models.get_model(name, in_channels=channels, image_size=size, **kw)
    out = m(torch.randn(2, channels, size, size))
    if name == "autoencoder":
        assert m.task == "reconstruction" and out.shape == (2, channels * size * size)
    else:
        assert getattr(m, "task", "classification") == "classification" and out.shape == (2, 10)


def test_resnet18_matches_the_adahessian_paper():
    # "RESNET18 ... having 11 175 370 parameters" (1-channel 7x7 stem, 10 classes)
    assert models.num_parameters(models.get_model("resnet18")) == 11_175_370
    small = models.get_model("resnet18", stem="small")
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, torch.nn.Identity)


def test_lenet5_layer_sizes():
    m = models.get_model("lenet5")
    assert m.classifier[0].in_features == 400                # 16 x 5 x 5 as in the 32x32 original
    assert models.num_parameters(m) == 61_706


def test_autoencoder_default_is_the_deep_mnist_autoencoder():
    m = models.get_model("autoencoder")
    sizes = [l.out_features for l in m.modules() if isinstance(l, torch.nn.Linear)]
    assert sizes == [1000, 500, 250, 30, 250, 500, 1000, 784]


def test_factory_errors_and_aliases():
    assert isinstance(models.get_model("LeNet-5"), models.LeNet5)
    with pytest.raises(ValueError, match="model must be one of"):
        models.get_model("vgg16")
    with pytest.raises(ValueError, match="activation"):
        models.get_model("mlp", activation="swishy")
    with pytest.raises(ValueError, match="stem"):
        models.get_model("resnet18", stem="huge")
