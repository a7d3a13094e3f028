"""Command line: `aligner <command> [RECIPE] [--flag value ...]`.

    aligner pretrain recipes/pretrain.yaml         # train tokenizer + GPT core on the task world
    aligner pretrain --max_steps 100 --train.lr 1e-3
    aligner sft recipes/chat.yaml                  # chat SFT from runs/pretrain/final
    aligner dpo --beta 0.1                         # DPO from runs/sft/final (recipes/dpo.yaml)
    aligner rm recipes/reward.yaml                 # reward model from runs/sft/final
    aligner grpo recipes/grpo.yaml                 # GRPO from runs/sft/final with the task world's rewards
    aligner generate runs/sft/final --chat --prompt "What is 7 + 5?"
    aligner chat runs/sft/final                    # interactive, streamed, /reset and /exit
    aligner export runs/sft_lora/final out/merged  # merge a LoRA adapter into a full HF model
    aligner serve-rollouts runs/sft/final          # vLLM rollout server for rollout.engine: vllm_server

Errors in the user's input print one line and exit with code 2; a run stopped by a non-finite loss
exits with code 1, and so does any other exception, which is aligner's own bug: it shows its traceback
and a line asking to report it. ALIGNER_DEBUG=1 shows the traceback of input errors too. Nothing
imports this module.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from aligner.config import ALGORITHMS  # every registered algorithm (the built-in ones by aligner.sections)
from aligner.errors import AlignerError, ConfigError

USAGE = """usage: aligner <command> [RECIPE] [--flag value ...]

commands:
{commands}
  generate       sample from a checkpoint: aligner generate CHECKPOINT --prompt TEXT
  export         merge a LoRA checkpoint into a full model: aligner export CHECKPOINT OUT_DIR
  eval           evaluate a checkpoint or Hub model on specs in evals/: aligner eval CHECKPOINT [SPEC ...] --items 500
  chat           talk to a checkpoint, replies streamed: aligner chat CHECKPOINT
  serve-rollouts vLLM rollout server for rollout.engine vllm_server: aligner serve-rollouts MODEL --port 8000
  report         plots and a markdown summary of runs: aligner report RUN_DIR... [--out DIR]
  pipeline       pretrain -> SFT -> RM -> DPO, PPO, GRPO -> eval: aligner pipeline recipes/pipeline.yaml

Flags override the recipe: --lr 3e-4 (the command's own section first, then the one section that has
the key) or --train.lr 3e-4 (always). Boolean flags may omit the value: --resume, --overwrite.
`aligner <command> --help` lists every field a training command reads: flag, type, value, meaning
(`aligner <command> RECIPE [--flags] --help` shows that recipe's values).
"""


class Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported as aligner reports every input error: one line, exit code 2."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")


def sampling_params(**kw):
    """SamplingParams from command-line values; a value out of range is a one-line error naming its flag."""
    from aligner.rollout.engine import SamplingParams

    try:
        return SamplingParams(**kw)
    except ValueError as e:
        name = str(e).split(" ", 1)[0]
        flag = {"n": "-n"}.get(name, "--" + name.replace("_", "-"))
        raise ConfigError(f"{flag}: {str(e).split(' ', 1)[1]}") from None


def _usage() -> str:
    lines = "\n".join(f"  {name:<14} {alg.help}" for name, alg in ALGORITHMS.items())
    return USAGE.format(commands=lines)


def run_training(command: str, argv: list[str]) -> int:
    from pathlib import Path

    from aligner.config import check_writable, default_recipe_path, load_recipe, parse_flags

    recipe_path = None
    if argv and not argv[0].startswith("--"):
        recipe_path, argv = argv[0], argv[1:]
    if recipe_path is None:
        recipe_path = default_recipe_path(command)
    recipe = load_recipe(recipe_path, parse_flags(argv), command=command)
    from aligner.tracking import main_process

    check_writable(Path(recipe.train.out_dir) / recipe.train.name, "train.out_dir")  # before the data is read
    if main_process():  # at once, before the heavy imports and the data: the run has started
        m, d, t = recipe.model, recipe.data, recipe.train
        print(
            f"{command}: {recipe.path or 'built-in defaults'}, model {m.init_from or 'a fresh GPT core'}, "
            f"data {d.source}{f' ({d.split})' if not d.source.startswith('world') else ''} -> {t.out_dir}/{t.name}",
            flush=True,
        )
    run_dir = Path(recipe.train.out_dir) / recipe.train.name
    missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # the directories this run makes
    try:
        result = ALGORITHMS[command].command()(recipe)
    except AlignerError as e:
        from aligner.trainers.base import TrainingError
        from aligner.trainers.checkpoints import discard_unstarted

        if missing and main_process() and not isinstance(e, TrainingError):
            discard_unstarted(run_dir, missing[-1])  # an input error before the first step leaves nothing behind
        raise
    leave_process_group()
    if not result["is_main"]:
        return 0
    if result["metrics"]:
        print("final " + "  ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
    if "accuracy" in result:
        acc = result["accuracy"]
        lo, hi = acc["ci95"]
        print(f"held-out accuracy {acc['accuracy']:.3f} (95% interval {lo:.3f}-{hi:.3f}, {acc['n']} items)")
    for prompt, completion in result["samples"]:
        print(f"--- sample\n{prompt}{completion}" if command == "pretrain" else f"--- answer {prompt}\n{completion}")
    print(f"checkpoint: {result['run_dir']}/final")
    return 0


def run_eval(argv: list[str]) -> int:
    p = Parser(prog="aligner eval", description="Evaluate a checkpoint on task specs (evals/*.yaml): table + JSON.")
    p.add_argument("checkpoint", help="checkpoint directory (full model, adapter or reward model) or Hub model name")
    p.add_argument(
        "specs", nargs="*", default=["task_world"], help="spec files or names in evals/ (default: task_world)"
    )
    p.add_argument("--items", type=int, default=None, help="rows per spec (overrides data.items)")
    p.add_argument("--source", default=None, help="data source: a file, dataset directory or Hub name (data.source)")
    p.add_argument("--split", default=None, help="data split (overrides data.split)")
    p.add_argument("--seed", type=int, default=None, help="task-world seed (overrides data.seed)")
    p.add_argument("--unique", action="store_true", help="score each distinct prompt once (sets data.unique)")
    p.add_argument("--metrics", default=None, help="comma-separated metrics (overrides the specs' own)")
    p.add_argument("--reference", default=None, help="reference checkpoint for win_rate and kl")
    p.add_argument("--reward-model", default=None, help="reward-model checkpoint for win_rate / reward_accuracy")
    p.add_argument("--template", default=None, help="chat template file or prompts/ name (default: the tokenizer's)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--checker", default=None, help="answer checker, e.g. math_answer (overrides the specs' own)")
    p.add_argument("--out", default=None, help="JSON file for the results (default: runs/eval/<checkpoint>.json)")
    args = p.parse_args(argv)

    from aligner.errors import ConfigError
    from aligner.evaluate import METRICS, evaluate, load_spec
    from aligner.model.tokenizer import load_chat_template

    for flag, value in (("--items", args.items), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    check_checkpoint(args.checkpoint)
    specs = [load_spec(name) for name in args.specs]
    for spec in specs:
        for key, value in (("items", args.items), ("source", args.source), ("split", args.split), ("seed", args.seed)):
            if value is not None:
                setattr(spec.data, key, value)
        spec.data.unique = spec.data.unique or args.unique
        if args.max_new_tokens is not None:
            spec.sampling.max_new_tokens = args.max_new_tokens
        if args.metrics:
            spec.metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
            unknown = [m for m in spec.metrics if m not in METRICS]
            if unknown:
                raise ConfigError(f"--metrics: unknown metric '{unknown[0]}' (use {', '.join(METRICS)})")
        spec.checker = args.checker or spec.checker
        spec.reference = args.reference or spec.reference
        spec.reward_model = args.reward_model or spec.reward_model
    template = load_chat_template(args.template) if args.template else None
    from pathlib import Path

    from aligner.config import check_writable
    from aligner.evaluate import default_output

    check_writable(Path(args.out or default_output(args.checkpoint)).parent, "--out")
    evaluate(args.checkpoint, specs, template=template, out=args.out)
    return 0


def run_export(argv: list[str]) -> int:
    p = Parser(prog="aligner export", description="Merge a LoRA adapter into a full model.")
    p.add_argument("checkpoint", help="a checkpoint holding an adapter (runs/<name>/final)")
    p.add_argument("out_dir", help="where to write the merged model (HF format) and its tokenizer")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    args = p.parse_args(argv)
    from aligner.config import check_writable
    from aligner.model.load import export_merged

    check_writable(args.out_dir, "out_dir")
    out = export_merged(args.checkpoint, args.out_dir, overwrite=args.overwrite)
    print(f"merged model: {out}")
    return 0


def check_checkpoint(path: str) -> None:
    """A local full model (config.json) or LoRA adapter (adapter_config.json), or a Hugging Face Hub name;
    anything else is a one-line error."""
    from pathlib import Path

    from aligner.errors import ConfigError
    from aligner.model.load import locate

    p = Path(locate(path, "checkpoint"))
    if p.is_dir() and not ((p / "config.json").is_file() or (p / "adapter_config.json").is_file()):
        raise ConfigError(f"'{path}' is not a checkpoint directory (no config.json or adapter_config.json)")


def run_generate(argv: list[str]) -> int:
    p = Parser(prog="aligner generate", description="Sample from a checkpoint.")
    p.add_argument("checkpoint", help="checkpoint directory (runs/<name>/final, a step dir, or an HF model dir)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn with the chat template")
    p.add_argument("--system", default=None, help="system prompt for --chat")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("-n", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", choices=["auto", "gpt", "hf"], default="auto")
    args = p.parse_args(argv)

    from aligner.data.chat import encode_prompt, pad_token_id, reply_stop_ids
    from aligner.errors import ConfigError
    from aligner.model.load import load_model, load_tokenizer
    from aligner.rollout.torch_engine import TorchEngine

    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    gen.update(min_p=args.min_p, n=args.n, seed=args.seed)
    sampling_params(**gen)  # bad values are errors before anything is loaded
    check_checkpoint(args.checkpoint)
    tokenizer = load_tokenizer(args.checkpoint)
    model = load_model(args.checkpoint, arch=args.arch)
    if args.chat:
        if not tokenizer.chat_template:
            raise ConfigError(f"{args.checkpoint}: the tokenizer has no chat template; drop --chat")
        system = [{"role": "system", "content": args.system}] if args.system else []
        # rendered exactly as SFT rendered its prompts (generation prompt appended)
        ids = [encode_prompt(tokenizer, system + [{"role": "user", "content": p}]) for p in args.prompt]
    else:
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in args.prompt]
    engine = TorchEngine(model, pad_id=pad_token_id(tokenizer))
    params = sampling_params(**gen, stop_ids=tuple(reply_stop_ids(tokenizer)))
    outs = engine.generate(ids, params)
    for i, out in enumerate(outs):
        prompt = args.prompt[i // args.n]
        text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
        print(f"--- [{i}] {prompt}\n{text}" if args.chat else f"--- [{i}]\n{prompt}{text}")
    return 0


def run_serve_rollouts(argv: list[str]) -> int:
    p = Parser(prog="aligner serve-rollouts", description="Serve a model with vLLM for rollout.engine: vllm_server.")
    p.add_argument("model", help="the policy's starting model: checkpoint directory or Hub name (its init_from)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", help="vLLM's weight dtype (auto: the checkpoint's)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM's share of GPU (CPU) memory")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the server shards the model over")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion")
    p.add_argument("--cpu-kv-cache-gib", type=float, default=1.0, help="KV cache size without CUDA")
    args, extra = p.parse_known_args(argv)  # the flags it does not know are vLLM's own
    from aligner.rollout.vllm_server import serve, server_command

    a = args
    serve(
        server_command(
            a.model, host=a.host, port=a.port, dtype=a.dtype, memory=a.gpu_memory_utilization,
            tensor_parallel=a.tensor_parallel_size, max_model_len=a.max_model_len, cpu_kv_cache_gib=a.cpu_kv_cache_gib,
            extra=extra,
        )
    )  # fmt: skip
    return 0


def run_chat(argv: list[str]) -> int:
    p = Parser(prog="aligner chat", description="Talk to a checkpoint; replies are streamed.")
    p.add_argument("checkpoint", help="checkpoint directory (full model or adapter)")
    p.add_argument("--system", default="system.txt", help="system prompt: a file, a file in prompts/, or text")
    p.add_argument("--template", default=None, help="chat template file or prompts/ name (default: the tokenizer's)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--arch", choices=["auto", "gpt", "hf"], default="auto")
    args = p.parse_args(argv)
    from aligner.interactive import chat

    sampling_params(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    check_checkpoint(args.checkpoint)
    return chat(args)


def run_pipeline(argv: list[str]) -> int:
    p = Parser(prog="aligner pipeline", description="Every stage, the eval, one table.")
    p.add_argument("file", nargs="?", default="recipes/pipeline.yaml", help="the pipeline file")
    p.add_argument("--redo", nargs="+", default=[], help="stages to rerun (and those after them), or all")
    args = p.parse_args(argv)
    from aligner.pipeline import pipeline

    pipeline(args.file, redo=args.redo)
    return 0


def run_report(argv: list[str]) -> int:
    p = Parser(prog="aligner report", description="PNG plots and a markdown summary of runs.")
    p.add_argument("runs", nargs="+", help="run directories (runs/<name>)")
    p.add_argument("--out", default="runs/report", help="directory for the PNGs and report.md")
    args = p.parse_args(argv)
    from aligner.report import write_report

    shown = write_report(args.runs, args.out)
    print(f"report: {args.out}/report.md ({', '.join(shown) or 'no curves'})")
    return 0


def leave_process_group() -> None:
    """Processes of a launch leave their group together: a barrier, then the group destroyed (a process that
    exits while torch.distributed.checkpoint's threads still hold the group can abort). What is left of the
    run is collected first, while the group exists: a DeepSpeed engine (kept in reference cycles) tears its
    optimizer down when collected, which at exit, after the group, aborts the process."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:  # not vLLM's own, in-process
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command in ALGORITHMS:
            if "-h" in rest or "--help" in rest:
                from aligner.help import command_help

                print(command_help(command, rest, ALGORITHMS[command].help))
                return 0
            return run_training(command, rest)
        if command == "generate":
            return run_generate(rest)
        if command == "export":
            return run_export(rest)
        if command == "eval":
            return run_eval(rest)
        if command == "chat":
            return run_chat(rest)
        if command == "serve-rollouts":
            return run_serve_rollouts(rest)
        if command == "report":
            return run_report(rest)
        if command == "pipeline":
            return run_pipeline(rest)
        print(f"error: unknown command '{command}'\n\n{_usage()}", file=sys.stderr)
        return 2
    except AlignerError as e:  # the input's fault (or a run stopped by a non-finite loss: exit 1)
        from aligner.trainers.base import TrainingError

        if os.environ.get("ALIGNER_DEBUG"):
            traceback.print_exc()
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1 if isinstance(e, TrainingError) else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # anything else is aligner's own bug: the traceback, and a line saying so
        traceback.print_exc()
        print(
            "error: the traceback above is a bug in aligner, not a problem with your input; please report it "
            "with the command that gave it",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
