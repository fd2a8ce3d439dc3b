"""The model registry: every model by name, on grey 8x8 and colour 32x32 inputs."""

import pytest
import torch

from pmafl.models import create_model, model_names


@pytest.mark.parametrize("name", [n for n in model_names() if "<" not in n] + ["torchvision/resnet18"])
@pytest.mark.parametrize("channels, size", [(1, 8), (3, 32)])
def test_model_maps_images_to_class_logits(name, channels, size):
    model = create_model(name, 7, channels, [0.5] * channels, [0.25] * channels).eval()
    with torch.no_grad():
        assert model(torch.rand(2, channels, size, size)).shape == (2, 7)


def test_normalisation_is_inside_the_model_and_out_of_the_state_dict():
    model = create_model("cnn-small", 10, 1, [0.3], [0.4])
    assert not any(key.endswith(("mean", "std")) for key in model.state_dict())
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(model(x), model.net((x - 0.3) / 0.4))


def test_student_is_smaller_than_teacher():
    def size(name):
        return sum(p.numel() for p in create_model(name, 10, 1, [0.5], [0.5]).parameters())

    assert size("cnn-small") * 5 < size("cnn-large")


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'vgg'; known: cnn-large, cnn-small, resnet18"):
        create_model("vgg", 10, 1, [0.5], [0.5])
