"""The vLLM server engine's client side against a stand-in server (no vLLM needed): the requests it makes,
the order it reads completions in, bucketed weight pushes, the trainer's use of it, and its errors. The
real server is tested in tests/test_vllm.py (`make test-vllm`)."""

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from aligner.errors import ConfigError
from aligner.rollout.engine import SamplingParams
from aligner.rollout.torch_engine import TorchEngine
from aligner.rollout.weights import Reassembly, unpack_bucket


class StandIn:
    """What `aligner serve-rollouts` answers, with a torch model standing in for vLLM's."""

    def __init__(self, model):
        self.model = model.eval()
        self.requests: list[tuple[str, dict]] = []
        self.buckets = 0
        self.loaded: set[str] = set()

    def handle(self, path: str, body: dict | None):
        self.requests.append((path, body))
        if path == "/v1/models":
            return {"data": [{"id": "stand-in", "max_model_len": 256}]}
        if path == "/reset_prefix_cache":
            return None
        if path == "/collective_rpc":
            method, args = body["method"], body.get("args", [])
            if method == "aligner_begin_weights":
                self.loaded, self.reassembly = set(), Reassembly()
                return {"results": [None]}
            if method == "aligner_load_bucket":
                import base64

                params = self.model.state_dict()
                for name, t in self.reassembly.add(unpack_bucket(args[0], base64.b64decode(args[1]))):
                    params[name].copy_(t)
                    self.loaded.add(name)
                self.buckets += 1
                return {"results": [len(args)]}
            if method == "aligner_end_weights":
                self.reassembly.check_done()
                return {"results": [len(self.loaded)]}
        if path == "/v1/completions":
            params = SamplingParams(
                max_new_tokens=body["max_tokens"], temperature=body["temperature"], n=body["n"],
                stop_ids=tuple(body["stop_token_ids"]), seed=body["seed"],
            )  # fmt: skip
            outs = TorchEngine(self.model, pad_id=0).generate(body["prompt"], params)
            choices = [
                {"index": i, "token_ids": o.token_ids, "logprobs": {"token_logprobs": o.logprobs},
                 "finish_reason": "stop" if o.finished else "length"}
                for i, o in enumerate(outs)
            ]  # fmt: skip
            random.Random(0).shuffle(choices)  # the client orders by index, not by position
            return {"choices": choices}
        raise KeyError(path)


@pytest.fixture
def stand_in():
    from tests.test_rollout_weights import tiny_gpt

    server = StandIn(tiny_gpt())

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def answer(self, body):
            try:
                out = server.handle(self.path, body)
            except KeyError:
                self.send_response(404)
                self.end_headers()
                self.wfile.write(b'{"detail": "Not Found"}')
                return
            data = b"" if out is None else json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.answer(None)

        def do_POST(self):
            self.answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    server.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield server
    httpd.shutdown()


def test_completions_come_back_grouped_per_prompt_with_their_logprobs(stand_in):
    from aligner.rollout.vllm_server import VLLMServerEngine

    remote = VLLMServerEngine(stand_in.url)
    assert remote.model_name == "stand-in"
    prompts = [[1, 2, 3], [4, 5], [6]]
    params = SamplingParams(max_new_tokens=5, temperature=1.0, n=2, seed=3, stop_ids=(7,))
    outs = remote.generate(prompts, params)
    local = TorchEngine(stand_in.model, pad_id=0).generate(prompts, params)
    assert [o.prompt_ids for o in outs] == [[1, 2, 3]] * 2 + [[4, 5]] * 2 + [[6]] * 2
    assert [(o.token_ids, o.logprobs, o.finished) for o in outs] == [
        (o.token_ids, o.logprobs, o.finished) for o in local
    ]
    sent = stand_in.requests[-1][1]
    assert sent["ignore_eos"] and sent["logprobs"] == 0 and sent["return_token_ids"] and sent["stop_token_ids"] == [7]


def test_weights_are_pushed_in_buckets_and_the_prefix_cache_reset(stand_in):
    from aligner.rollout.vllm_server import VLLMServerEngine
    from tests.test_rollout_weights import tiny_gpt

    policy = tiny_gpt()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    remote = VLLMServerEngine(stand_in.url, bucket_mb=2048 / 2**20)  # 2 KiB buckets
    remote.sync_weights(policy)
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), stand_in.model.state_dict().values()))
    assert stand_in.buckets == remote.last_sync["buckets"] > 3
    paths = [p for p, _ in stand_in.requests]
    assert paths[-1] == "/reset_prefix_cache"
    methods = [b["method"] for p, b in stand_in.requests if p == "/collective_rpc"]
    assert methods[0] == "aligner_begin_weights" and methods[-1] == "aligner_end_weights"
    stand_in.requests.clear()
    VLLMServerEngine(stand_in.url, sender=False).sync_weights(policy)  # another process: nothing is sent
    assert [p for p, _ in stand_in.requests] == ["/v1/models"]


def test_a_server_that_loads_fewer_weights_is_an_error(stand_in):
    from aligner.rollout.vllm_server import VLLMServerEngine
    from tests.test_rollout_weights import tiny_gpt

    handle = stand_in.handle
    stand_in.handle = lambda path, body: (
        {"results": [1]} if body and body.get("method") == "aligner_end_weights" else handle(path, body)
    )
    with pytest.raises(ConfigError, match="serve the policy's own model"):
        VLLMServerEngine(stand_in.url).sync_weights(tiny_gpt())


def test_no_server_is_a_one_line_error(tmp_path, capsys):
    import socket

    from aligner.cli import main
    from aligner.rollout.vllm_server import VLLMServerEngine

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(ConfigError, match="aligner serve-rollouts"):
        VLLMServerEngine(f"http://127.0.0.1:{port}")
    assert main(["grpo", "--rollout.engine", "vllm_server", "--rollout.server_url", "localhost:8000"]) == 2
    assert "rollout.server_url must be an http://" in capsys.readouterr().err


def test_serve_rollouts_refuses_an_adapter_directory(tmp_path, capsys):
    from aligner.cli import main

    (tmp_path / "adapter_config.json").write_text("{}")
    assert main(["serve-rollouts", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and ("serve its base model" in err or "vLLM is not installed" in err)


def test_grpo_trains_on_rollouts_from_a_server(stand_in, bases, tmp_path, id_reward):
    """The trainer pushes its weights before every rollout (the first too: a server may hold anything) and
    logs the time it took."""
    from conftest import grpo_recipe

    from aligner.cli import main
    from aligner.model.gpt import GPT

    checkpoint = bases / "gpt"
    stand_in.model = GPT.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        for p in stand_in.model.parameters():
            p.zero_()  # what an unsynced server would sample from: nothing like the policy
    rollout = {"max_new_tokens": 8, "engine": "vllm_server", "server_url": stand_in.url, "sync_bucket_mb": 0.01}
    grpo = {"rewards": [id_reward], "mask_truncated": False}
    path = grpo_recipe(tmp_path, checkpoint, grpo=grpo, rollout=rollout, data={"num_eval_rows": 0})
    assert main(["grpo", str(path)]) == 0
    rows = [json.loads(x) for x in (tmp_path / "runs/g/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["rollout/weight_sync_s"] > 0 for r in rows)
    methods = [b["method"] for p, b in stand_in.requests if p == "/collective_rpc"]
    assert methods.count("aligner_begin_weights") == 3 and stand_in.buckets > 3 * 3
    final = GPT.from_pretrained(tmp_path / "runs/g/final")
    pushed = stand_in.model.state_dict()  # the weights after step 2, pushed before the third rollout
    assert any(not torch.equal(pushed[k], v) for k, v in final.state_dict().items())  # the last step moved them


def test_two_sharded_processes_push_once_and_both_sample(stand_in, bases, tmp_path, id_reward):
    """Under FSDP2 the weights are gathered on every process and pushed by the main one only; both processes
    sample their own prompts from the server after the push."""
    from conftest import grpo_recipe, launch_two_processes

    from aligner.model.gpt import GPT

    checkpoint = bases / "gpt"
    stand_in.model = GPT.from_pretrained(checkpoint).eval()
    rollout = {"max_new_tokens": 8, "engine": "vllm_server", "server_url": stand_in.url, "sync_bucket_mb": 0.01}
    path = grpo_recipe(
        tmp_path, checkpoint, grpo={"rewards": [id_reward], "mask_truncated": False}, rollout=rollout,
        data={"num_eval_rows": 0}, train={"micro_batch_size": 4, "max_steps": 2},
    )  # fmt: skip
    launch_two_processes(["grpo", str(path)], {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    methods = [b["method"] for p, b in stand_in.requests if p == "/collective_rpc"]
    assert methods.count("aligner_begin_weights") == 2  # one push per rollout, not one per process
    assert len([p for p, _ in stand_in.requests if p == "/v1/completions"]) == 4  # 2 rollouts x 2 processes
    assert (tmp_path / "runs/g/final/model.safetensors").is_file()
