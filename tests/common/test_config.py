"""The config checks every method's `validate` uses."""

import dataclasses

import pytest

from common.config import check_positive
from gan import train as gan_train
from learned_optimizers import train as lo_train
from maml import train as maml_train
from nas import child


def test_check_positive_names_the_first_field_below_one():
    @dataclasses.dataclass(frozen=True)
    class Config:
        a: int = 1
        b: int = 0
        c: int = -1

    check_positive(Config(), ("a",))
    with pytest.raises(ValueError, match=r"^b must be positive, got 0\.$"):
        check_positive(Config(), ("a", "b", "c"))


def test_method_configs_refuse_non_positive_sizes():
    with pytest.raises(ValueError, match="sample_every must be positive, got 0"):
        gan_train.Config(sample_every=0).validate()
    with pytest.raises(ValueError, match="shots must be positive, got -2"):
        maml_train.Config(shots=-2).validate()


@pytest.mark.parametrize("config", [
    gan_train.Config(dataset="cifar10"), maml_train.Config(dataset="cifar10"),
    lo_train.Config(dataset="cifar10"), child.ChildConfig(dataset="cifar10"),
    lo_train.Config(mixture_datasets=("fashion_mnist:/data", "cifar10"))])
def test_an_unknown_dataset_is_refused_naming_the_choices(config):
    with pytest.raises(ValueError, match=r"'cifar10'.* one of [a-z_]+, "):
        config.validate()
