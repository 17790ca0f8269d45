"""Flags generated from a config dataclass (launch/flags.py): names, types, nested prefixes, help
from the docstring, defaults from the dataclass, and the config built back from parsed flags."""

import dataclasses
import importlib
import textwrap

import pytest

from common import config as config_lib

from tests.conftest import run_python

SCRIPT = textwrap.dedent('''
    from __future__ import annotations
    import dataclasses
    from common.config import check_choices, choice, nested
    from launch import flags as launch_flags

    @dataclasses.dataclass(frozen=True)
    class Sub:
        """A sub-config.

        Attributes:
          num_samples: Samples per
            evaluation.
          parzen: Whether to include Parzen.
        """
        num_samples: int = 10
        parzen: bool = True

    @dataclasses.dataclass(frozen=True)
    class Config:
        """A config.

        Attributes:
          model: The model.
          learning_rate: Learning rate.
          horizons: Horizons.
          tasks: Transfer tasks.
          data_dir: Where the data is.
          eval: Evaluation settings.
        """
        model: str = choice("dcgan", ("dcgan", "mlp"))
        learning_rate: float = 1e-3
        horizons: tuple[int, ...] = (100, 200)
        tasks: tuple[str, ...] = choice((), ("a", "b"))
        data_dir: str | None = None
        eval: Sub = nested(Sub, num_samples=5)

    @dataclasses.dataclass(frozen=True)
    class Undocumented:
        """No attributes section."""
        x: int = 1

    launch_flags.define_config_flags(Config)
    FLAGS = launch_flags.FLAGS
    FLAGS(["x", "--workdir=w"])
    assert launch_flags.config_from_flags(Config) == Config()
    assert FLAGS["eval_num_samples"].help == "Samples per evaluation. (default: 5)"
    assert FLAGS["model"].help.endswith("The model. (default: dcgan)"), FLAGS["model"].help
    FLAGS.unparse_flags()
    FLAGS(["x", "--workdir=w", "--learning_rate=2", "--horizons=3", "--horizons=4", "--tasks=a",
           "--eval_parzen=false", "--model=mlp", "--data_dir=/d"])
    config = launch_flags.config_from_flags(Config)
    assert config == Config(model="mlp", learning_rate=2.0, horizons=(3, 4), tasks=("a",),
                            data_dir="/d", eval=Sub(num_samples=5, parzen=False)), config
    check_choices(config)
    try:
        check_choices(dataclasses.replace(config, tasks=("a", "c")))
    except ValueError as e:
        print("CHOICE", e)
    try:
        FLAGS(["x", "--workdir=w", "--model=gan"])
    except Exception as e:
        print("ENUM", type(e).__name__)
    try:
        launch_flags.define_config_flags(Undocumented)
    except TypeError as e:
        print("UNDOCUMENTED", e)
''')


def test_flags_are_generated_from_the_config_and_build_it_back():
    out = run_python(["-c", SCRIPT]).stdout.splitlines()
    assert out == ["CHOICE Unknown tasks 'c'; choose one of a, b.", "ENUM IllegalFlagValueError",
                   "UNDOCUMENTED Undocumented.x has no entry in the class docstring's Attributes: "
                   "section (its flag's help)."]


@pytest.mark.parametrize("module", ["gan.train", "learned_optimizers.train", "maml.train",
                                    "nas.train"])
def test_config_dict_round_trip(module):
    """`config.json` (to_dict) read back (from_dict) is the config, nested configs and tuples
    included; an unknown key is refused."""
    config_cls = importlib.import_module(module).Config
    config = config_cls()
    changed = {}
    for field in dataclasses.fields(config):  # a non-default value wherever that is simple
        value = getattr(config, field.name)
        if isinstance(value, bool):
            changed[field.name] = not value
        elif isinstance(value, int) and not field.metadata.get("choices"):
            changed[field.name] = value + 1
    config = dataclasses.replace(config, **changed)
    assert config_lib.from_dict(config_cls, config_lib.to_dict(config)) == config
    with pytest.raises(ValueError, match="has no field no_such_field"):
        config_lib.from_dict(config_cls, {"no_such_field": 1})
