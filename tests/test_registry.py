"""An algorithm is its own files: a toy one, written by this test in a module of its own (its section, its
command and its trainer on the shared loop), is registered and then runs from the command line, flags,
`--help` and the default-recipe lookup included, and as a pipeline stage, with no aligner file touched."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml
from conftest import tiny_run_recipe

from aligner import registry
from aligner.cli import main

TOY = textwrap.dedent('''
    """A toy algorithm: SFT whose loss is scaled by `toy.scale`."""
    from dataclasses import dataclass
    from pathlib import Path

    from aligner.registry import Algorithm, register


    @dataclass
    class ToyConfig:
        scale: float = 1.0  # multiplies the SFT loss
        chat_template: str | None = None  # template file or name in prompts/; None = the tokenizer's own

        def checks(self, recipe):
            return [(self.scale > 0, "toy.scale must be positive")]


    def trainer_class():
        from aligner.trainers.sft import SFTTrainer

        class ToyTrainer(SFTTrainer):
            stage = "toy"

            def compute_loss(self, model, batch):
                loss, stats = super().compute_loss(model, batch)
                return self.recipe.toy.scale * loss, {"scale": self.recipe.toy.scale + 0 * loss.detach()}

        return ToyTrainer


    def run(recipe):
        from aligner.trainers.base import prepare_run_dir
        from aligner.trainers.setup import prepare_model, sft_tokenizer, train_and_score
        from aligner.trainers.sft import encode_conversations

        tokenizer = sft_tokenizer(recipe, "toy")
        train, evals, report = encode_conversations(recipe, tokenizer)
        model = prepare_model(recipe, tokenizer, stage="toy")
        prepare_run_dir(Path(recipe.train.out_dir) / recipe.train.name, recipe.train.resume, recipe.train.overwrite)
        trainer = trainer_class()(recipe, model, tokenizer, train, evals)
        print(f"toy: scale {recipe.toy.scale}, {report}")
        return train_and_score(trainer, trainer.unwrapped, tokenizer, 0, 8)


    register(Algorithm(
        name="toy", section="toy", config=ToyConfig, run="toy_algorithm:run", trainer="toy_algorithm:trainer_class",
        recipe=None, help="a toy: SFT with a scaled loss", reads=("toy", "sft", "model", "data", "train"),
        starts_from="sft",
    ))
''')


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy module importable and registered; the registry restored afterwards."""
    (tmp_path / "toy_algorithm.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    before_algorithms, before_sections = dict(registry.ALGORITHMS), dict(registry.SECTIONS)
    import importlib
    import sys

    sys.modules.pop("toy_algorithm", None)
    importlib.import_module("toy_algorithm")
    yield registry.ALGORITHMS["toy"]
    for d, before in ((registry.ALGORITHMS, before_algorithms), (registry.SECTIONS, before_sections)):
        d.clear()
        d.update(before)
    sys.modules.pop("toy_algorithm", None)


def toy_recipe(tmp_path, base, **sections):
    recipe = {
        "model": {"init_from": str(base)},
        "toy": {"scale": 2.0},
        "data": {"source": "world:sft", "num_rows": 32, "num_eval_rows": 4, "seq_len": 256},
        "train": {"name": "toy", "lr": 1e-2, "max_steps": 2},
        "sft": {"chat_template": "chatml"},
    }
    return tiny_run_recipe(tmp_path, recipe, sections, "toy.yaml")


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_registered_toy_algorithm_runs_from_the_command_line(toy, bases, tmp_path, capsys):
    recipe = toy_recipe(tmp_path, bases / "gpt")
    assert main(["toy", str(recipe), "--scale", "3"]) == 0  # a bare flag finds the toy's own section
    assert "toy: scale 3.0" in capsys.readouterr().out
    run = tmp_path / "runs" / "toy"
    assert (run / "final" / "config.json").is_file()
    assert metrics(run)[0]["toy/scale"] == 3.0
    assert yaml.safe_load((run / "recipe.yaml").read_text().split("\n", 1)[1])["toy"]["scale"] == 3.0

    assert main(["toy", str(recipe), "--scale", "-1"]) == 2  # its checks run like the built-in sections'
    assert "toy.scale must be positive" in capsys.readouterr().err
    assert main(["toy", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--scale" in out and "multiplies the SFT loss" in out
    assert main(["--help"]) == 0
    assert "a toy: SFT with a scaled loss" in capsys.readouterr().out


def test_the_toy_loss_scale_scales_the_gradient(toy, bases, tmp_path):
    """The toy's trainer is on the shared loop: a loss scaled by 2 gives twice the gradient norm."""
    for scale in (1, 2):
        recipe = toy_recipe(tmp_path, bases / "gpt", train={"name": f"s{scale}", "max_steps": 1, "grad_clip": 0})
        assert main(["toy", str(recipe), "--scale", str(scale)]) == 0
    one, two = metrics(tmp_path / "runs/s1")[0], metrics(tmp_path / "runs/s2")[0]
    assert two["train/grad_norm"] == pytest.approx(2 * one["train/grad_norm"], rel=1e-4)


def test_the_toy_is_a_pipeline_stage_after_sft(toy, tmp_path, capsys):
    small = {"train.precision": "fp32", "train.progress": False, "train.eval_every": 0, "train.save_every": 0}
    small.update({"data.num_rows": 32, "data.num_eval_rows": 4, "train.micro_batch_size": 4, "train.max_steps": 2})
    pretrain = {
        **small, "data.num_rows": 200, "model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2,
        "model.num_kv_heads": 1, "tokenizer.vocab_size": 400, "tokenizer.train_rows": 200,
    }  # fmt: skip
    toy_file = tmp_path / "toy_stage.yaml"
    toy_file.write_text("# the toy stage\ntoy: {scale: 2.0}\ndata: {source: 'world:sft'}\ntrain: {name: toy}\n")
    spec = {
        "out_dir": str(tmp_path / "runs"),
        "stages": {
            "pretrain": {"recipe": "recipes/pretrain.yaml", "flags": pretrain},
            "sft": {"recipe": "recipes/chat.yaml", "flags": {**small, "sft.samples": 0}},
            "toy": {"recipe": str(toy_file), "flags": small},
        },
        "eval": {"items": 4, "kl_items": 2, "max_new_tokens": 8},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text("# a pipeline with the toy\n" + yaml.safe_dump(spec))
    assert main(["pipeline", str(path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "runs/toy/final/config.json").is_file() and "| toy |" in out
    saved = yaml.safe_load((tmp_path / "runs/toy/recipe.yaml").read_text().split("\n", 1)[1])
    assert saved["model"]["init_from"] == str(tmp_path / "runs/sft/final")  # starts_from wired it
