"""Sampling changes the distribution as it should: temperature, top-k and top-p each checked against the
distribution they must give (many seeded draws from a fixed logits vector), directly, through
``generate_ids`` and on a tiny model's real decode loop; nonsensical settings are refused."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gemmaforge import from_config, preset
from gemmaforge.errors import InputError
from gemmaforge.inference.generate import check_sampling, generate_ids, sample_next

# 8 tokens, all distinct: p = softmax(LOGITS) ~ [.39 .24 .14 .09 .05 .03 .02 .01 ...] (mass everywhere)
LOGITS = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5])
N = 20_000
TV_TOL = 0.025  # total variation allowed between the empirical and the expected distribution (N draws: ~0.01)


def draws(n=N, seed=0, **kw) -> Counter:
    g = torch.Generator().manual_seed(seed)
    return Counter(sample_next(LOGITS, generator=g, **kw) for _ in range(n))


def expected(temperature=1.0, top_k=None, top_p=None, logits=LOGITS) -> torch.Tensor:
    """The distribution sampling must follow, written out independently of ``sample_next``."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = torch.argsort(p, descending=True).tolist()
    keep = order[:top_k] if top_k else order
    if top_p is not None:
        q = p[keep] / p[keep].sum()
        nucleus, mass = [], 0.0
        for tok, pk in zip(keep, q.tolist()):  # the smallest prefix holding top_p
            nucleus.append(tok)
            mass += pk
            if mass >= top_p:
                break
        keep = nucleus
    out = torch.zeros_like(p)
    out[keep] = p[keep] / p[keep].sum()
    return out


def tv(counts: Counter, p: torch.Tensor) -> float:
    n = sum(counts.values())
    emp = torch.zeros_like(p)
    for k, c in counts.items():
        emp[k] = c / n
    return 0.5 * float((emp - p).abs().sum())


def entropy(counts: Counter) -> float:
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


# ------------------------------------------------------------------------------------ sample_next


def test_plain_sampling_follows_softmax():
    c = draws(temperature=1.0)
    assert tv(c, expected(1.0)) < TV_TOL
    assert set(c) == set(range(len(LOGITS)))  # every token, even the least likely, is drawn


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_never_outside_the_k_most_likely_and_samples_each(k):
    c = draws(temperature=1.0, top_k=k)
    assert set(c) == set(range(k))  # LOGITS is sorted: the top k are ids 0..k-1
    assert tv(c, expected(1.0, top_k=k)) < TV_TOL
    # ignoring top_k would be caught: without it tokens outside the top k come out often
    assert sum(v for t, v in draws(5000, temperature=1.0).items() if t >= k) > 100


@pytest.mark.parametrize("top_p", [0.3, 0.5, 0.7, 0.9, 0.95])
def test_top_p_never_outside_the_nucleus_and_samples_each_of_it(top_p):
    p = torch.softmax(LOGITS.double(), -1)
    cum = p.cumsum(0)
    size = int((cum < top_p).sum()) + 1  # the smallest prefix whose mass reaches top_p
    assert size < len(LOGITS)
    c = draws(temperature=1.0, top_p=top_p)
    assert set(c) == set(range(size)), (top_p, size, sorted(c))
    assert tv(c, expected(1.0, top_p=top_p)) < TV_TOL


def test_top_p_one_keeps_everything_and_tiny_top_p_is_greedy():
    assert set(draws(5000, temperature=1.0, top_p=1.0)) == set(range(len(LOGITS)))
    assert set(draws(500, temperature=1.0, top_p=1e-6)) == {0}


def test_top_k_then_top_p():
    # top_k 4 first, then the nucleus of the renormalised 4: p ~ [.47 .28 .17 .10] -> 0.7 keeps 2
    c = draws(temperature=1.0, top_k=4, top_p=0.7)
    assert set(c) == {0, 1}
    assert tv(c, expected(1.0, top_k=4, top_p=0.7)) < TV_TOL


@pytest.mark.parametrize("temperature", [0.25, 0.5, 2.0, 5.0])
def test_temperature_gives_softmax_of_logits_over_t(temperature):
    c = draws(temperature=temperature)
    assert tv(c, expected(temperature)) < TV_TOL
    assert tv(c, expected(1.0)) > 0.05  # distinguishable from ignoring the temperature


def test_temperature_orders_the_entropy():
    temps = [0.1, 0.3, 0.6, 1.0, 2.0, 8.0]
    ents = [entropy(draws(5000, temperature=t)) for t in temps]
    assert all(a < b for a, b in zip(ents, ents[1:])), ents
    for t, e in zip(temps, ents):  # and each is the entropy of softmax(logits / T)
        p = expected(t)
        assert abs(e - float(-(p * p.clamp_min(1e-300).log()).sum())) < 0.03, (t, e)
    assert ents[-1] > 0.95 * math.log(len(LOGITS))  # a hot sampler is near uniform
    assert ents[0] < 0.1  # a cold one near greedy


def test_temperature_zero_is_greedy_whatever_top_k_top_p():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, generator=g)
    for kw in ({}, {"top_k": 5}, {"top_p": 0.5}, {"top_k": 1, "top_p": 0.1}):
        assert sample_next(logits, temperature=0.0, **kw) == int(logits.argmax())


def test_tiny_and_huge_temperatures_are_finite():
    g = torch.Generator().manual_seed(0)
    assert {sample_next(LOGITS * 1e4, temperature=1e-30, generator=g) for _ in range(50)} == {0}
    c = draws(5000, temperature=1e30)
    assert tv(c, torch.full((len(LOGITS),), 1 / len(LOGITS), dtype=torch.double)) < 0.05


def test_same_seed_same_draws_other_seed_other_draws():
    a = [sample_next(LOGITS, 1.0, generator=torch.Generator().manual_seed(3)) for _ in range(1)]
    g1, g2, g3 = (torch.Generator().manual_seed(s) for s in (3, 3, 4))
    s1 = [sample_next(LOGITS, 1.0, generator=g1) for _ in range(200)]
    s2 = [sample_next(LOGITS, 1.0, generator=g2) for _ in range(200)]
    s3 = [sample_next(LOGITS, 1.0, generator=g3) for _ in range(200)]
    assert s1 == s2 and s1 != s3 and s1[0] == a[0]


# ------------------------------------------------------------------------------ through generate_ids


class FixedLogits(nn.Module):
    """A stand-in model for ``generate_ids``: the same next-token logits at every position."""

    def __init__(self, logits, ctx=4096):
        super().__init__()
        self.register_buffer("z", logits.float())
        self.config = SimpleNamespace(eos_token_id=[], max_position_embeddings=ctx)
        self.calls = 0

    @property
    def device(self):
        return torch.device("cpu")

    def new_cache(self, max_len):
        return None

    def forward(self, ids, cache=None, return_hidden=True):
        self.calls += 1
        return torch.zeros(ids.shape[0], ids.shape[1], 1)

    def logits(self, h):
        return self.z.expand(h.shape[0], -1)


def first_tokens(model, n, **kw) -> Counter:
    return Counter(generate_ids(model, [2, 7], max_new_tokens=1, seed=s, stop_ids=set(), **kw).ids[0]
                   for s in range(n))


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.4), dict(temperature=3.0),
                                dict(temperature=1.0, top_k=3), dict(temperature=1.0, top_p=0.8),
                                dict(temperature=2.0, top_k=5, top_p=0.9)])
def test_generate_ids_first_token_distribution(kw):
    m = FixedLogits(LOGITS)
    c = first_tokens(m, 4000, **kw)
    exp = expected(**kw)
    assert tv(c, exp) < 0.04, (kw, sorted(c.items()))
    assert {i for i in c} <= {i for i in range(len(LOGITS)) if exp[i] > 0}  # never outside
    assert {i for i in range(len(LOGITS)) if exp[i] > 10 / 4000} <= set(c)  # each likely one inside


def test_generate_ids_every_step_obeys_top_k_and_top_p():
    m = FixedLogits(LOGITS)
    ids = generate_ids(m, [2], max_new_tokens=400, temperature=1.0, top_k=3, seed=0, stop_ids=set()).ids
    assert len(ids) == 400 and set(ids) == {0, 1, 2}
    ids = generate_ids(m, [2], max_new_tokens=400, temperature=1.0, top_p=0.5, seed=0, stop_ids=set()).ids
    assert set(ids) == {0, 1}  # p ~ .39, .24: the nucleus of 0.5 is two tokens
    ids = generate_ids(m, [2], max_new_tokens=400, temperature=5.0, seed=0, stop_ids=set()).ids
    assert len(set(ids)) == len(LOGITS)


def test_generate_ids_stops_on_a_stop_id_and_honours_max_new_tokens():
    m = FixedLogits(LOGITS)
    st = generate_ids(m, [2], max_new_tokens=500, temperature=1.0, top_k=3, seed=1, stop_ids={2})
    assert st.stopped_on == 2 and 2 not in st.ids and st.new_tokens == len(st.ids) < 500
    st = generate_ids(m, [2], max_new_tokens=7, temperature=1.0, seed=1, stop_ids=set())
    assert st.new_tokens == 7 and m.calls > 0


@pytest.fixture(scope="module")
def tiny():
    return from_config(preset("gemma-3-tiny"), seed=0)


def _next_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1].float()


def _step_logits(model, prompt, ids):
    """The logits each generated token was drawn from, by one full forward (no cache) of the whole text."""
    with torch.no_grad():
        z = model(torch.tensor([prompt + ids]))[0].float()
    return [z[len(prompt) - 1 + t] for t in range(len(ids))]


def test_tiny_model_decode_loop_samples_within_top_k_and_nucleus(tiny):
    """Through the KV cache: every sampled token is inside the top-k / nucleus of the logits a full
    forward of its prefix gives (the tiny model's logits are flat: a low temperature spreads them)."""
    prompt = [2, 17, 33, 99, 5]
    for seed in range(3):
        ids = generate_ids(tiny, prompt, max_new_tokens=6, temperature=0.05, top_k=3, seed=seed, stop_ids=set()).ids
        assert len(ids) == 6
        for t, (tok, z) in enumerate(zip(ids, _step_logits(tiny, prompt, ids))):
            assert tok in torch.topk(z, 3).indices.tolist(), (seed, t)
    first = {generate_ids(tiny, prompt, max_new_tokens=1, temperature=0.05, top_k=3, seed=s, stop_ids=set()).ids[0]
             for s in range(8)}
    assert len(first) >= 2 and first <= set(torch.topk(_next_logits(tiny, prompt), 3).indices.tolist())
    for seed in range(3):
        ids = generate_ids(tiny, prompt, max_new_tokens=5, temperature=0.05, top_p=0.6, seed=seed, stop_ids=set()).ids
        for t, (tok, z) in enumerate(zip(ids, _step_logits(tiny, prompt, ids))):
            assert expected(0.05, top_p=0.6, logits=z)[tok] > 0, (seed, t)


def test_tiny_model_greedy_is_argmax_and_temperature_spreads(tiny):
    prompt = [2, 40, 41]
    ids = generate_ids(tiny, prompt, max_new_tokens=5, stop_ids=set()).ids
    for tok, z in zip(ids, _step_logits(tiny, prompt, ids)):
        assert tok == int(z.argmax())
    cold = {generate_ids(tiny, prompt, max_new_tokens=1, temperature=1e-3, seed=s, stop_ids=set()).ids[0]
            for s in range(12)}
    hot = {generate_ids(tiny, prompt, max_new_tokens=1, temperature=1.0, seed=s, stop_ids=set()).ids[0]
           for s in range(12)}
    assert cold == {ids[0]} and len(hot) >= 8  # 512 nearly equal logits at T=1


# ------------------------------------------------------------------------------ nonsensical settings


@pytest.mark.parametrize("kw, name", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(top_k=0), "top_k"), (dict(top_k=-3), "top_k"),
    (dict(top_k=2.5), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=2.0), "top_p"), (dict(top_p=-0.1), "top_p"),
    (dict(max_new_tokens=-5), "max_new_tokens"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"), (dict(seed=1.5), "seed"), (dict(temperature="hot"), "temperature"),
])
def test_nonsensical_settings_are_refused(kw, name):
    full = dict(max_new_tokens=4, temperature=1.0) | kw
    with pytest.raises(InputError, match=rf"^{name}="):
        check_sampling(**full)
    with pytest.raises(InputError, match=rf"^{name}="):
        generate_ids(FixedLogits(LOGITS), [2], stop_ids=set(), **full)


def test_sensible_settings_pass():
    check_sampling(1, 0.0)
    check_sampling(5, 0.7, top_k=1, top_p=1.0, seed=-1)
    check_sampling(5, 2, top_k=50, top_p=0.01, seed=0)
