"""Block streaming and pinned host copies: a streamed model computes exactly what the resident one
does (the same maths on the same numbers: bit-identical), whatever is streamed, however often the
layout changes, with the DiT's own loop (``block_streamer``) or module hooks (the text encoder)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from multitalk.models.transformer import load_transformer
from multitalk.runtime.block_streaming import BlockStreamer, spread
from multitalk.runtime.host_memory import ALIGN, HostCopy, PerUseWeights, tensor_bytes
from multitalk.runtime.placement import Placement

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dit(tiny_ckpt_dir):
    return load_transformer(tiny_ckpt_dir)


def _forward(model, v):
    with torch.no_grad():
        return model(v["x"][None], v["t"], [v["context"]], v["clip_fea"], v["y"], v["audio"], v["ref_target_masks"])


def _views_of(copy: HostCopy, module: nn.Module) -> bool:
    base = copy.buffer.data.data_ptr()
    return all(base <= t.data_ptr() < base + copy.nbytes for t in module.parameters())


@pytest.mark.parametrize("streamed,prefetch", [((0, 1), 1), ((1,), 2)])
def test_streamed_dit_is_bit_identical_to_resident(dit, golden_vectors, streamed, prefetch):
    v = golden_vectors("dit_2person_bbox")
    ref = _forward(dit, v)
    placement = Placement(CPU)
    placement.set_policy(dit, "streamed", blocks=dit.blocks, streamed=streamed, prefetch=prefetch)
    streamer = placement.policy(dit).streamer
    try:
        with placement.use(dit):
            outs = [_forward(dit, v) for _ in range(2)]
        assert all(torch.equal(o, ref) for o in outs)
        assert streamer.stats.blocks_streamed == 2 * len(streamed)
        assert streamer.stats.waited == 0          # every copy was queued before its block ran
        for i in streamed:                          # outside a use the blocks live in the host copy
            assert _views_of(streamer.host[i], dit.blocks[i])
        with pytest.raises(RuntimeError, match="outside begin"):
            _forward(dit, v)
    finally:
        placement.set_policy(dit, "gpu")            # back to resident for the other tests
    assert dit.block_streamer is None
    assert torch.equal(_forward(dit, v), ref)


def test_restreaming_changes_the_layout_without_changing_the_output(dit, golden_vectors):
    v = golden_vectors("dit_1person")
    ref = _forward(dit, v)
    placement = Placement(CPU)
    try:
        for streamed in ((1,), (0,), ()):
            placement.set_policy(dit, "streamed" if streamed else "gpu", blocks=dit.blocks, streamed=streamed)
            with placement.use(dit):
                assert torch.equal(_forward(dit, v), ref), streamed
            policy = placement.policy(dit)
            if streamed:
                assert sorted(policy.streamer.host) == list(streamed)
                kept = [i for i in range(2) if i not in streamed]
                for i in kept:   # a block made resident again owns fresh memory, not a host view
                    assert all(t.data_ptr() not in {h.buffer.data.data_ptr() for h in policy.streamer.host.values()}
                               for t in dit.blocks[i].parameters())
    finally:
        placement.set_policy(dit, "gpu")


class Chain(nn.Module):
    """Six identical blocks run in a loop that tells a streamer around each call (like run_blocks)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(6))
        self.block_streamer = None

    def forward(self, x, upto: int | None = None):
        for i, block in enumerate(self.blocks):
            if upto is not None and i == upto:
                raise RuntimeError("stop")
            if self.block_streamer is not None:
                self.block_streamer.before_block(i)
            x = block(x)
            if self.block_streamer is not None:
                self.block_streamer.after_block(i)
        return x


def test_slots_cycle_through_forwards_and_survive_an_interrupted_one():
    model = Chain()
    x = torch.randn(4, 32)
    with torch.no_grad():
        ref = model(x)
    streamed = spread(6, 4)
    assert streamed == [1, 2, 4, 5]
    streamer = BlockStreamer(model.blocks, streamed, CPU, prefetch=1)
    model.block_streamer = streamer
    assert streamer.num_slots == 2 and streamer.host_bytes == 4 * tensor_bytes(model.blocks[0])
    streamer.begin()
    with torch.no_grad():
        assert torch.equal(model(x), ref)
        with pytest.raises(RuntimeError):
            model(x, upto=4)          # an error after block 2 (a streamed one is still in its slot)
        for _ in range(3):
            assert torch.equal(model(x), ref)
    streamer.end()
    # 5 forwards of 4 streamed blocks; the interrupted one ran 2 of them
    assert streamer.stats.blocks_streamed == 4 * 4 + 2
    # after the error the next forward started over at block 1, which was not in a slot: one wait
    assert streamer.stats.waited == 1
    streamer.detach()
    with torch.no_grad():
        assert torch.equal(model(x), ref)   # the hooks-free model, every block resident again


def test_text_encoder_streamed_through_hooks_gives_the_same_contexts(tiny_ckpt_dir):
    from multitalk.models.text_encoder import TextEncoder

    enc = TextEncoder.from_checkpoint(tiny_ckpt_dir)
    prompts = ["two people talking in a car", "worst quality"]
    ref = enc.encode(prompts)
    placement = Placement(CPU)
    model = enc.model
    placement.set_policy(model, "streamed", blocks=model.encoder.block, prefix="encoder.block.",
                         streamed=range(len(model.encoder.block)), other="per_use", hooks=True)
    for _ in range(2):
        with placement.use(model):
            out = enc.encode(prompts)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
    streamer = placement.policy(model).streamer
    assert streamer.stats.blocks_streamed == 2 * len(model.encoder.block)
    # the embedding (tied to encoder.embed_tokens) is a per-use host copy, held once
    other = placement.policy(model).other
    assert model.shared.weight is model.encoder.embed_tokens.weight
    assert _views_of(other.host, model.shared)
    placement.set_policy(model, "gpu")
    assert all(torch.equal(a, b) for a, b in zip(enc.encode(prompts), ref))


def test_host_copy_is_one_aligned_buffer_holding_each_tensor_once():
    lin = nn.Linear(33, 7)
    tied = nn.Module()
    tied.a, tied.b = lin, nn.Linear(33, 7)
    tied.b.weight = lin.weight                    # tied: one tensor object in two places
    values = {id(t): t.detach().clone() for t in tied.parameters()}
    copy = HostCopy(tied, pin=False)
    assert len(copy.tensors) == 3                 # a.weight (= b.weight), a.bias, b.bias
    assert copy.nbytes == sum(-(-t.numel() * 4 // ALIGN) * ALIGN for t in copy.tensors)
    assert all(v.data_ptr() % ALIGN == 0 for v in copy.views)
    assert all(torch.equal(t, values[id(t)]) for t in copy.tensors)
    assert tied.b.weight.data_ptr() == tied.a.weight.data_ptr() == copy.views[0].data_ptr()


def test_per_use_weights_come_and_go_around_each_use():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(2, 8)
    with torch.no_grad():
        ref = model(x)
    weights = PerUseWeights(model, CPU)
    home = {t.data_ptr() for t in weights.host.views}
    for _ in range(2):
        weights.onload()
        assert not any(p.data_ptr() in home for p in model.parameters())
        with torch.no_grad():
            assert torch.equal(model(x), ref)
        weights.offload()
        assert {p.data_ptr() for p in model.parameters()} <= home
    weights.release()
    assert not any(p.data_ptr() in home for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(x), ref)
