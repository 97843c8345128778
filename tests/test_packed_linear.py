"""Packed products for decoding on CPU (ops.packed_linear, cpu_policy.PackedLinear / for_decoding):
equal to F.linear within fp32 rounding inside ``packed_decoding()``, exactly F.linear outside it and
under autograd, refreshed when the weight changes, invisible to parameter names, copies and hooks."""

import copy

import torch
from torch import nn

from gemmaforge import cpu_policy, from_config
from gemmaforge.inference.batch import generate_batch_ids
from gemmaforge.adapters.lora import LoraConfig, apply_lora
from gemmaforge.models.registry import preset
from gemmaforge.ops import packed_linear
from gemmaforge.ops.packed_linear import PackedWeight, packed_decoding

def test_packed_linear_equals_f_linear_and_only_inside_decoding(onednn):
    torch.manual_seed(0)
    lin = nn.Linear(96, 80)
    x = torch.randn(3, 5, 96)
    pl = cpu_policy.PackedLinear.sharing(lin)
    assert pl.weight is lin.weight and pl.bias is lin.bias
    ref = nn.functional.linear(x, lin.weight, lin.bias)
    with torch.no_grad():
        assert torch.equal(pl(x), ref)  # outside packed_decoding: F.linear itself
        with packed_decoding():
            assert packed_linear.applies(x, lin.weight, lin.bias)
            got = pl(x)
    assert pl.packed.packed is not None  # the packed copy was made and used
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # one row, many rows: the same numbers within rounding
    with torch.no_grad(), packed_decoding():
        torch.testing.assert_close(pl(x[0, :1]), ref[0, :1], rtol=1e-5, atol=1e-5)
    # autograd inside packed_decoding: F.linear, with gradients
    with packed_decoding():
        assert not packed_linear.applies(x, lin.weight, lin.bias)
        y = pl(x)
    y.sum().backward()
    assert lin.weight.grad is not None and torch.equal(y.detach(), ref.detach())
    # other dtypes: F.linear
    with torch.no_grad(), packed_decoding():
        assert not packed_linear.applies(x.double(), lin.weight.double())


def test_packed_copy_follows_the_weight(onednn):
    """Made again after an in-place change (version bump), a new storage, and a fused AdamW step (which
    changes the weight without bumping its version: a gradient's arrival marks the copy stale)."""
    torch.manual_seed(0)
    lin = cpu_policy.PackedLinear.sharing(nn.Linear(64, 48, bias=False))
    x = torch.randn(4, 64)

    def check():
        with torch.no_grad(), packed_decoding():
            torch.testing.assert_close(lin(x), x @ lin.weight.detach().t(), rtol=1e-5, atol=1e-5)

    check()
    with torch.no_grad():
        lin.weight.mul_(-2.0)
    check()
    lin.weight.data = torch.randn(48, 64)
    check()
    opt = torch.optim.AdamW(lin.parameters(), lr=0.5, fused=True)
    for _ in range(2):
        lin(torch.randn(4, 64)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        check()


def test_for_decoding_keeps_names_copies_and_hooked_modules(onednn):
    m = from_config(preset("gemma-3-tiny"), dtype="float32").eval()
    names = [n for n, _ in m.named_parameters()]
    state = {k: v.clone() for k, v in m.state_dict().items()}
    seen = []
    hooked = m.model.layers["0"].self_attn.q_proj
    hooked.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    assert cpu_policy.for_decoding(m) == "packed"
    assert [n for n, _ in m.named_parameters()] == names
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    assert type(m.model.layers["0"].self_attn.q_proj) is nn.Linear  # a module hook: left as it is
    assert isinstance(m.model.layers["0"].mlp.down_proj, cpu_policy.PackedLinear)
    assert isinstance(m.lm_head, cpu_policy.CPUHead)
    generate_batch_ids(m, [[2, 5, 9], [2, 7]], max_new_tokens=3)
    assert seen and m.lm_head.packed.packed is not None
    twin = copy.deepcopy(m)  # the packed copies are not copied (oneDNN tensors do not deepcopy)
    assert twin.lm_head.packed.packed is None
    assert cpu_policy.use_packed_linears(m) == 0  # idempotent
    n_packed = sum(1 for mod in m.modules() if isinstance(getattr(mod, "packed", None), PackedWeight))
    assert cpu_policy.release_packed(m) == n_packed > 1  # GRPO frees them between rollouts
    assert m.lm_head.packed.packed is None and cpu_policy.release_packed(m) == 0


def test_packed_decoding_greedy_tokens_equal_plain_decoding(onednn, monkeypatch):
    """Greedy batched decoding over packed weights makes the tokens plain F.linear decoding makes
    (tiny random model, ragged prompts), with a LoRA adapter on (its frozen base packed too)."""
    torch.manual_seed(0)
    prompts = [[2] + torch.randint(3, 200, (n,)).tolist() for n in (1, 7, 30)]
    outs = []
    for pays in (True, False):
        monkeypatch.setattr(packed_linear, "packing_pays", lambda pays=pays: pays)
        torch.manual_seed(1)
        m = from_config(preset("gemma-3-tiny"), dtype="float32").eval()
        apply_lora(m, LoraConfig(rank=4, targets=["q_proj", "v_proj"]))
        for mod in m.modules():
            if hasattr(mod, "lora_B"):
                nn.init.normal_(mod.lora_B.weight, std=0.05)
        outs.append(generate_batch_ids(m, prompts, max_new_tokens=12))
        lora = m.model.layers["0"].self_attn.q_proj
        assert (lora.packed.packed is not None) == pays
    assert outs[0] == outs[1]
