"""bft.trainer.config: the bundled configs, the loss settings in the YAML config and on the command line
(validated, and carried to the loss by ``loss_module``)."""

from __future__ import annotations

import re

import pytest
from bft.kernels.params import COMPLETION_TERMS
from bft.trainer.config import load_config


def test_trainer_config_kl_weight_is_validated_and_forwarded():
    from bft.trainer.config import ConfigError, load_config
    from bft.trainer.train import loss_module

    assert load_config("tiny-cpu").loss.kl_weight == 1.0
    assert loss_module(load_config("tiny-cpu", ["loss.kl_weight=0"])).params.kl_weight == 0.0
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ConfigError, match="loss.kl_weight must be a finite number >= 0"):
            load_config("tiny-cpu", [f"loss.kl_weight={bad}"])


def test_trainer_config_takes_the_log_mass_floor():
    from bft.trainer.config import ConfigError, load_config
    from bft.trainer.train import loss_module

    assert load_config("tiny-cpu").loss.completion_floor == 1e-6
    params = loss_module(load_config("tiny-cpu", ["loss.completion=log_mass", "loss.completion_floor=1e-9"])).params
    assert (params.completion, params.completion_floor) == ("log_mass", 1e-9)
    with pytest.raises(ConfigError, match=r"^loss.completion_floor must be a probability in \(0, 1\)"):
        load_config("tiny-cpu", ["loss.completion_floor=0"])


def test_trainer_config_and_the_command_line_set_the_rule(capsys):
    from bft.trainer.config import ConfigError, load_config
    from bft.trainer.train import loss_module

    from bft.cli import console_main

    assert load_config("tiny-cpu").loss.selection == "vocab"
    config = load_config("tiny-cpu", ["loss.selection=base_topp", "loss.selection_top_p=0.75", "loss.completion=mass"])
    params = loss_module(config).params
    assert (params.selection, params.selection_top_p, params.completion) == ("base_topp", 0.75, "mass")
    with pytest.raises(ConfigError, match=r"^loss.selection_top_p must be in \(0, 1\]"):
        load_config("tiny-cpu", ["loss.selection=base_topp", "loss.selection_top_p=2"])
    assert console_main(["train", "tiny-cpu", "loss.selection=nucleus"]) == 2
    assert capsys.readouterr().err == (
        "bft train: error: loss.selection must be one of ('vocab', 'base_topp'), got 'nucleus'\n"
    )


def test_trainer_config_sets_the_completion_term():
    from bft.trainer.config import ConfigError, load_config
    from bft.trainer.train import loss_module

    default = load_config("tiny-cpu")
    assert default.loss.completion == "l2" and loss_module(default).params.completion == "l2"
    config = load_config("tiny-cpu", ["loss.completion=mass"])
    objective = loss_module(config)
    assert objective.params == config.loss.params and objective.params.completion == "mass"
    assert objective.backend == config.loss.backend == "torch"
    with pytest.raises(ConfigError, match=rf"^loss.completion must be one of {re.escape(str(COMPLETION_TERMS))}"):
        load_config("tiny-cpu", ["loss.completion=l1"])
    with pytest.raises(ConfigError, match=r"^loss.backend must be one of"):
        load_config("tiny-cpu", ["loss.backend=cuda"])


def test_bft_train_with_an_unknown_term_is_one_line_and_status_2(capsys):
    from bft.cli import console_main

    assert console_main(["train", "tiny-cpu", "loss.completion=logits"]) == 2
    assert capsys.readouterr().err == (
        f"bft train: error: loss.completion must be one of {COMPLETION_TERMS}, got 'logits'\n"
    )


def test_every_bundled_config_validates_with_the_paper_defaults():
    from bft.trainer.config import Config, bundled_configs

    names = bundled_configs()
    assert {"tiny-cpu", "smollm2-135m", "llama-3.1-8b-lora", "llama-3.1-8b-full", "qwen-2.5-7b-lora"} <= set(names)
    defaults = Config()
    for c in (defaults, *(load_config(n) for n in names)):
        assert c.loss.teacher_lambda == 1.2 and c.loss.temperature == 2.0 and c.data.harmful_ratio == 0.4
    assert defaults.loss.top_k == 100 and defaults.optim.lr == 1e-5
    for name in names:
        if name != "tiny-cpu":  # the tiny vocabulary has 102 tokens and needs a large lr
            c = load_config(name)
            assert c.loss.top_k == 100 and c.optim.lr == 1e-5, name
