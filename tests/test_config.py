"""Recipe loading: strict keys and types, flag resolution, one-line errors."""

import dataclasses

import pytest

from aligner import config as C
from aligner.errors import ConfigError
from aligner.registry import Algorithm


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_recipe_file(tmp_path):
    r = C.load_recipe(write(tmp_path, "train:\n  lr: 0.01\n  name: x\nmodel:\n  num_layers: 2\n"))
    assert r.train.lr == 0.01 and r.train.name == "x" and r.model.num_layers == 2
    assert r.data.seq_len == C.DataConfig().seq_len


def test_every_recipe_in_repo_loads():
    recipes = sorted((C.REPO_ROOT / "recipes").rglob("*.yaml"))
    assert recipes
    for path in recipes:
        text = path.read_text()
        assert text.startswith("#"), f"{path} needs a header (command + expected result)"
        if path.parent.name == "accelerate":  # launcher configs (accelerate launch --config_file), not recipes
            import yaml

            assert yaml.safe_load(text)["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED"), path
        elif path.name.startswith("pipeline"):  # pipeline files: their stages' recipes, with their flags
            from aligner.pipeline import load_pipeline, stage_recipe

            cfg = load_pipeline(path)
            for stage in cfg.stages:
                stage_recipe(cfg, stage, redo=False)
        elif "\n# section:" not in text:  # recipes of commands not in this package yet are skipped
            C.load_recipe(path)


def test_pyyaml_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML reads `3e-4` as a string; the loader converts it for float fields.
    r = C.load_recipe(write(tmp_path, "train:\n  lr: 3e-4\n"))
    assert r.train.lr == pytest.approx(3e-4)


def test_unknown_key_names_file_key_and_closest(tmp_path):
    p = write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        C.load_recipe(p)
    msg = str(e.value)
    assert str(p) in msg and "train.lrr" in msg and "did you mean 'lr'" in msg
    assert "\n" not in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'trian'.*did you mean 'train'"):
        C.load_recipe(write(tmp_path, "trian:\n  lr: 0.1\n"))


@pytest.mark.parametrize(
    "text, match",
    [
        ("train:\n  lr: fast\n", r"train\.lr must be float, got 'fast'"),
        ("train:\n  micro_batch_size: 2.5\n", r"train\.micro_batch_size must be int"),
        ("train:\n  resume: 1\n", r"train\.resume must be bool"),
        ("data:\n  world_levels: 3\n", r"data\.world_levels must be list of int"),
        ("train:\n  precision: fp8\n", r"train\.precision must be one of auto, fp32, bf16, fp16"),
        ("train: [1, 2]\n", r"train must be a mapping"),
        ("- just\n- a list\n", r"a recipe must be a mapping"),
        ("model:\n  num_heads: 3\n", r"divisible by num_heads"),
    ],
)
def test_wrong_types_and_values(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        C.load_recipe(write(tmp_path, text))


def test_malformed_yaml_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"r\.yaml: malformed YAML at line 3"):
        C.load_recipe(write(tmp_path, "train:\n  lr: [0.1\n  name: x\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe file '.*nope.yaml' not found"):
        C.load_recipe(tmp_path / "nope.yaml")


def test_flags_resolve_own_section_then_unique_section():
    flags = C.parse_flags(["--lr", "3e-4", "--train.name=run1", "--resume", "--num_layers", "2", "--trackers", "[]"])
    assert flags == {"lr": "3e-4", "train.name": "run1", "resume": True, "num_layers": 2, "trackers": []}
    r = C.load_recipe(None, flags, command="pretrain")
    assert r.train.lr == pytest.approx(3e-4) and r.train.name == "run1" and r.train.resume is True
    assert r.model.num_layers == 2
    assert C.resolve_flag("packing", "sft") == ("sft", "packing")


def test_unknown_and_ambiguous_flags(monkeypatch):
    with pytest.raises(ConfigError, match=r"unknown flag '--lrr' \(did you mean '--lr'\?\)"):
        C.resolve_flag("lrr", "pretrain")
    with pytest.raises(ConfigError, match=r"unknown flag '--train.lrr'.*train\.lr"):
        C.resolve_flag("train.lrr", "pretrain")

    @dataclasses.dataclass
    class Other:
        seed: int = 0  # clashes with train.seed

    monkeypatch.setitem(C.SECTIONS, "other", Other)
    with pytest.raises(ConfigError, match=r"ambiguous flag '--seed': use one of --train\.seed, --other\.seed"):
        C.resolve_flag("seed", "pretrain")
    other = Algorithm("other_cmd", "other", Other, "m:f", "m:C", None, "another algorithm")
    monkeypatch.setitem(C.ALGORITHMS, "other_cmd", other)
    assert C.resolve_flag("seed", "other_cmd") == ("other", "seed")


def test_flag_overrides_recipe_and_is_type_checked(tmp_path):
    p = write(tmp_path, "train:\n  lr: 0.1\n")
    assert C.load_recipe(p, {"train.lr": 0.5}).train.lr == 0.5
    with pytest.raises(ConfigError, match=r"r\.yaml: train\.max_steps must be int or null, got 'many'"):
        C.load_recipe(p, {"max_steps": "many"})


def test_resolved_recipe_round_trips(tmp_path):
    r = C.load_recipe(write(tmp_path, "train:\n  lr: 0.02\n"), {"num_layers": 3})
    C.save_recipe(r, tmp_path)
    again = C.load_recipe(tmp_path / "recipe.yaml")
    assert again.to_dict() == r.to_dict()


MIX_RECIPE = """\
data:
  subset: main
  columns: {question: prompt}
  num_rows: 40
  mix:
    - {source: data/a.jsonl, weight: 3}
    - source: org/dataset
      subset: socratic
      split: train_sft
      columns: {conversation: messages}
"""


def test_columns_and_mix(tmp_path):
    d = C.load_recipe(write(tmp_path, MIX_RECIPE)).data
    assert d.subset == "main" and d.columns == {"question": "prompt"}
    assert d.mix == [
        C.MixSource(source="data/a.jsonl", weight=3.0),
        C.MixSource(source="org/dataset", subset="socratic", split="train_sft", columns={"conversation": "messages"}),
    ]
    flags = C.parse_flags(["--data.columns", "{question: prompt}", "--data.mix", "[{source: a.jsonl}, {source: b}]"])
    d = C.load_recipe(None, flags).data
    assert d.columns == {"question": "prompt"} and [m.source for m in d.mix] == ["a.jsonl", "b"]


def test_recipe_with_columns_and_mix_round_trips(tmp_path):
    r = C.load_recipe(write(tmp_path, MIX_RECIPE), {"data.streaming": True})
    C.save_recipe(r, tmp_path)
    again = C.load_recipe(tmp_path / "recipe.yaml")
    assert again.data == r.data and again.to_dict() == r.to_dict()


@pytest.mark.parametrize(
    "flags, match",
    [
        (
            {"data.mix": [{"source": "a"}, {"source": "b", "wieght": 2}]},
            r"unknown key 'data\.mix\[1\]\.wieght'.*'weight'",
        ),
        ({"data.mix": [{"source": "a"}, {"source": "b", "weight": "x"}]}, r"data\.mix\[1\]\.weight must be float"),
        ({"data.mix": [{"weight": 2}]}, r"data\.mix\[0\]\.source is required"),
        ({"data.mix": ["a.jsonl"]}, r"data\.mix\[0\] must be a mapping"),
        ({"data.mix": [{"source": "a", "weight": 0}]}, r"data\.mix\[0\]\.weight must be positive"),
        ({"data.mix": [{"source": "a", "columns": {"q": None}}]}, r"data\.mix\[0\]\.columns\.q must be str"),
        ({"data.columns": "question"}, r"data\.columns must be dict"),
        ({"data.columns": {1: "prompt"}}, r"data\.columns key must be str, got 1"),
        (
            {"data.columns": {"q": "prompt", "question": "prompt"}},
            r"data\.columns renames several columns to 'prompt'",
        ),
        ({"data.source": "x.jsonl", "data.mix": [{"source": "a"}]}, r"data\.source 'x\.jsonl' and data\.mix are both"),
        ({"data.streaming": True}, r"data\.streaming reads only the first data\.num_rows rows; set it"),
        (
            {"data.streaming": True, "num_rows": 8, "eval_source": "e", "num_eval_rows": None},
            r"first data\.num_eval_rows rows of data\.eval_source",
        ),
    ],
)
def test_columns_mix_and_streaming_errors(flags, match):
    with pytest.raises(ConfigError, match=match) as e:
        C.load_recipe(None, flags)
    assert "\n" not in str(e.value)


def test_every_algorithms_end_of_run_evals_may_change_on_resume():
    """accuracy_items and accuracy_tokens change no optimisation, in any algorithm's section."""
    from aligner.config import load_recipe, parse_flags
    from aligner.trainers.checkpoints import recipe_changes

    for command in ("grpo", "rloo", "reinforce_pp", "online_dpo", "ppo"):
        old = load_recipe(None, command=command)
        new = load_recipe(None, parse_flags(["--accuracy_items", "7", "--accuracy_tokens", "9"]), command=command)
        assert getattr(new, command).accuracy_items == 7
        assert recipe_changes(old, new) == {}
        lr = load_recipe(None, parse_flags(["--lr", "0.5"]), command=command)
        assert recipe_changes(old, lr) == {"train.lr": (old.train.lr, 0.5)}
