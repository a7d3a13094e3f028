"""The weights a rollout engine is synced with: streamed under Hugging Face names, one tensor at a time and
without copies, LoRA adapters merged only while the stream is read (no vLLM needed)."""

import torch

from aligner.config import LoRAConfig
from aligner.rollout.weights import iter_hf_weights


def tiny_gpt():
    from aligner.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(
        GPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    )


def test_the_stream_is_the_parameters_themselves_under_llama_names():
    model = tiny_gpt()
    params = dict(model.state_dict())
    stream = iter_hf_weights(model)
    name, first = next(stream)
    assert name.startswith("model.") and first.data_ptr() == params[name].data_ptr()  # no copy
    names = [name] + [n for n, _ in stream]
    assert "model.layers.0.self_attn.q_proj.weight" in names and len(names) == len(params)


def test_lora_is_merged_while_streaming_and_unmerged_after():
    from aligner.model.load import apply_lora

    model = tiny_gpt()
    q = "model.layers.0.self_attn.q_proj.weight"
    before = model.state_dict()[q].clone()
    peft = apply_lora(model, LoRAConfig(enabled=True, r=2, alpha=4.0, dropout=0.0, target_modules=["q_proj"]))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # a non-zero adapter
    live = peft.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    copied = {}
    for name, t in iter_hf_weights(peft):
        copied[name] = t.clone()  # what a consumer copies while the stream runs
    assert not any("lora_" in n or "base_layer" in n for n in copied) and q in copied
    assert not torch.allclose(copied[q], before)  # base + (alpha / r) B A while streaming
    assert torch.allclose(live, before, atol=1e-6)  # unmerged again (to rounding)
    abandoned = iter_hf_weights(peft)
    next(abandoned)
    abandoned.close()  # a consumer that stops early: unmerged all the same
    assert torch.allclose(live, before, atol=1e-6)


def test_buckets_are_bounded_and_cover_the_stream_in_order():
    from aligner.rollout.weights import weight_buckets

    model = tiny_gpt()
    names = [n for n, _ in iter_hf_weights(model)]
    largest = max(t.numel() * t.element_size() for _, t in iter_hf_weights(model))
    limit = largest + 64  # room for the largest tensor and a little more: most buckets hold several
    buckets = list(weight_buckets(model, limit))
    assert [n for b in buckets for n, _ in b] == names
    assert 1 < len(buckets) < len(names)
    for b in buckets:
        assert sum(t.numel() * t.element_size() for _, t in b) <= limit
    singles = list(weight_buckets(model, 1))  # smaller than any tensor: each travels alone
    assert [len(b) for b in singles] == [1] * len(names)


def test_a_packed_bucket_unpacks_to_the_same_tensors_in_any_dtype_mix():
    from aligner.rollout.weights import pack_bucket, unpack_bucket

    torch.manual_seed(0)
    bucket = [
        ("a", torch.randn(3, dtype=torch.bfloat16)),  # 6 bytes: the next tensor starts aligned all the same
        ("b", torch.randn(2, 5)),
        ("c", torch.randn(4, 3, dtype=torch.float16).t()),  # not contiguous
        ("d", torch.randn(0)),
    ]
    buffer = torch.empty(1024, dtype=torch.uint8)
    meta, payload = pack_bucket(bucket, buffer)
    out = unpack_bucket(meta, bytes(payload))
    assert [(n, first, rows) for n, _, first, rows in out] == [("a", 0, -1), ("b", 0, -1), ("c", 0, -1), ("d", 0, -1)]
    for (_, x), (_, y, _, _) in zip(bucket, out):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    buffer.fill_(0)  # the unpacked tensors own their bytes
    assert torch.equal(out[1][1], bucket[1][1])
    try:
        unpack_bucket(meta, bytes(payload)[:-8])
        raise AssertionError("a short payload must be refused")
    except ValueError as e:
        assert "metadata says" in str(e)


def test_sharded_weights_are_gathered_as_they_stream(tmp_path):
    """FSDP2's parameters are DTensors: the stream gives each one's full tensor."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_gpt()
        full = {n: t.clone() for n, t in iter_hf_weights(model)}
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        assert any(hasattr(p, "full_tensor") for p in model.parameters())
        streamed = dict(iter_hf_weights(model))
        assert streamed.keys() == full.keys()
        assert all(not hasattr(t, "full_tensor") and torch.equal(t, full[n]) for n, t in streamed.items())
    finally:
        dist.destroy_process_group()


def test_buckets_hold_merged_adapters_until_the_last_one_is_taken():
    from aligner.model.load import apply_lora
    from aligner.rollout.weights import weight_buckets

    model = tiny_gpt()
    peft = apply_lora(model, LoRAConfig(enabled=True, r=2, alpha=4.0, dropout=0.0, target_modules=["q_proj"]))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    merged = {n: t.clone() for n, t in iter_hf_weights(peft)}
    for size in (2**30, 4096):  # one bucket for everything; several
        taken = {n: t.clone() for bucket in weight_buckets(peft, size) for n, t in bucket}
        assert taken.keys() == merged.keys()
        assert all(torch.equal(taken[n], merged[n]) for n in merged)


def test_a_tensor_larger_than_a_bucket_travels_in_runs_of_rows_and_is_reassembled():
    from aligner.rollout.weights import Reassembly, pack_bucket, unpack_bucket, wire_buckets

    model = tiny_gpt()  # the embedding table: 64 x 32 fp32 = 8 KiB, 128 bytes a row
    sent = {n: t.clone() for n, t in iter_hf_weights(model)}
    limit = 1000  # 7 rows of the table per run
    buckets = list(wire_buckets(model, limit))
    runs = [b for b in buckets if b[0][3] > 0]
    assert runs and all(len(b) == 1 and b[0][1].shape[0] <= 7 for b in runs)
    buffer = torch.empty(limit, dtype=torch.uint8)
    got, reassembly = {}, Reassembly()
    for bucket in buckets:
        meta, payload = pack_bucket(bucket, buffer)
        assert len(payload) <= limit + 8 * len(bucket)  # the fixed buffer (alignment aside): never a whole table
        got.update(reassembly.add(unpack_bucket(meta, bytes(payload))))
    reassembly.check_done()
    assert got.keys() == sent.keys() and all(torch.equal(got[n], sent[n]) for n in sent)
    partial = Reassembly()
    partial.add(unpack_bucket(*[bytes(x) if i else x for i, x in enumerate(pack_bucket(runs[0], buffer))]))
    try:
        partial.check_done()
        raise AssertionError("a tensor missing runs must be reported")
    except ValueError as e:
        assert "incomplete" in str(e)
