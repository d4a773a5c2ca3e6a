"""LoCoRe model: fast vs hf parity, a float64 dense reference (spec §4.4-4.11), layout, loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from float_bounds import (
    assert_close,
    assert_close_to_scale,
    float32_bound,
    locore_score_tolerances,
    max_abs,
)

from locore.core.errors import UserError
from locore.rerank.locore import LocoreConfig, LocoreInputs, LocoreModel, build_model
from locore.rerank.locore.attention import Layout, build_plan
from locore.rerank.locore.model import MODES, recalls

SMALL = LocoreConfig(
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    attention_window=8,
    max_positions=260,
    local_dim=24,  # projected 24 -> 32
    global_dim=32,  # identity
    num_scales=3,
    dropout=0.1,
)


def random_model(config: LocoreConfig = SMALL, seed: int = 0) -> LocoreModel:
    """Weights large enough (std 0.3) that attention is far from uniform and masks matter."""
    model = LocoreModel(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.3
            p.copy_(1 + noise if "LayerNorm.weight" in name else noise)
    return model


def random_inputs(
    config: LocoreConfig, batch: int, gallery: int, n: int, seed: int = 1, labels: bool = False
) -> LocoreInputs:
    """Inputs with padded query and gallery locals; padded rows hold noise, not zeros, so a
    leak through the mask changes the result. Gallery image 0 of list 0 has no valid local."""
    gen = torch.Generator().manual_seed(seed)
    gallery_mask = torch.rand(batch, gallery, n, generator=gen) < 0.3
    gallery_mask[0, 0] = True
    query_mask = torch.zeros(batch, n, dtype=torch.bool)
    query_mask[-1, n // 2 :] = True
    return LocoreInputs(
        query_local=torch.randn(batch, n, config.local_dim, generator=gen),
        query_scales=torch.randint(0, config.num_scales, (batch, n), generator=gen),
        query_mask=query_mask,
        gallery_local=torch.randn(batch, gallery, n, config.local_dim, generator=gen),
        gallery_scales=torch.randint(0, config.num_scales, (batch, gallery, n), generator=gen),
        gallery_mask=gallery_mask,
        query_global=torch.randn(batch, config.global_dim, generator=gen),
        gallery_global=torch.randn(batch, gallery, config.global_dim, generator=gen),
        positive_mask=torch.randint(0, 3, (batch, gallery), generator=gen) if labels else None,
    )


PARITY_CASES = {
    # name: (config changes, gallery images, locals per image)
    "short-no-window-padding": ({}, 3, 4),  # S = 4 x 6 = 24, a multiple of 8
    "window-padding": ({}, 4, 5),  # S = 35 -> 40
    "many-chunks": ({}, 12, 5),  # S = 91 -> 96, band crosses chunk edges
    "window-longer-than-list": ({"attention_window": 64}, 4, 5),  # S = 35 -> 64
    "only-seps-global": ({"query_global_attention": False}, 5, 4),
    "no-global-tokens": ({"use_global": False, "query_global_attention": False}, 6, 5),
    "bottleneck-gelu": ({"bottleneck_dim": 8, "linear_activation": "gelu", "global_dim": 20}, 5, 3),
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_fast_matches_hf(case):
    """Same arithmetic in another order: every logit within the float32 bound of 8 chained
    reductions per layer + 3, over max(hidden, FFN, padded tokens) terms (1.3e-5 of max|logit|
    here), carried to the scores and the loss by ``locore_score_tolerances``. Recalls are not
    compared: a near-tie of two scores may rank either way (``recalls`` is tested below)."""
    changes, gallery, n = PARITY_CASES[case]
    config = SMALL.replace(**changes)
    model = random_model(config)
    inputs = random_inputs(config, batch=2, gallery=gallery, n=n, labels=True)
    with torch.no_grad():
        fast, ref = model(inputs, backend="fast"), model(inputs, backend="hf")
    padded = -(-ref.token_logits.shape[1] // config.attention_window) * config.attention_window
    terms = max(config.hidden_size, config.intermediate_size, padded)
    eps = float32_bound(8 * config.num_layers + 3, terms) * max_abs(ref.token_logits)
    class1 = ref.token_logits[..., 1].view(2, 1 + gallery, -1)[:, 1:]
    tol = locore_score_tolerances(class1, eps)
    assert_close(fast.token_logits, ref.token_logits, tol["token_logits"], "token logits")
    for mode in MODES:
        assert_close(fast.scores[mode], ref.scores[mode], tol[mode], mode)
    assert_close(fast.loss.item(), ref.loss.item(), tol["loss"], "loss")
    assert fast.recalls.keys() == ref.recalls.keys()


def test_fast_matches_dense_reference_in_float64():
    """Exactness, not just agreement with HF (whose softmax is float32 even in float64).

    float64 (u = 1.1e-16) over the same 19 chained reductions of <= 64 terms promises ~2e-14 of
    the logits' scale; 1e-10 leaves room for any BLAS and still catches any formula change."""
    model = random_model().double()
    inputs = random_inputs(SMALL, batch=2, gallery=7, n=5)
    inputs.query_local, inputs.gallery_local = (
        inputs.query_local.double(),
        inputs.gallery_local.double(),
    )
    with torch.no_grad():
        out = model(inputs, backend="fast")
        expected = dense_reference(model, inputs)
    assert_close_to_scale(out.token_logits, expected, 1e-10, "token logits")
    c = expected[..., 1].view(2, 8, -1)[:, 1:, :-1]
    assert_close_to_scale(out.scores["max-start"], c[..., 0], 1e-10, "max-start")
    assert_close_to_scale(out.scores["max-end"], c[..., -1], 1e-10, "max-end")


def dense_reference(model: LocoreModel, x: LocoreInputs) -> torch.Tensor:
    """Token logits written straight from reference-spec §4.4-4.10 with full S x S masks."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    lm = "language_model.longformer."
    batch, n, _ = x.query_local.shape
    gallery = x.gallery_local.shape[1]
    block = n + 2  # [GLOBAL] n locals [SEP]
    length = (1 + gallery) * block
    padded = math.ceil(length / cfg.attention_window) * cfg.attention_window
    w, nh, hidden = cfg.attention_window // 2, cfg.num_heads, cfg.hidden_size
    d = hidden // nh

    def lin(t, name):
        return F.linear(t, sd[name + ".weight"], sd[name + ".bias"])

    u = sd[lm + "pad_embedding"].repeat(batch, padded, 1)
    m = torch.zeros(batch, padded, dtype=torch.long)  # 0 masked, 1 local, 2 global
    for b in range(batch):
        for img in range(1 + gallery):
            if img == 0:
                loc, scl, pad, glob = (
                    x.query_local[b],
                    x.query_scales[b],
                    x.query_mask[b],
                    x.query_global[b],
                )
            else:
                loc, scl, pad, glob = (
                    x.gallery_local[b, img - 1],
                    x.gallery_scales[b, img - 1],
                    x.gallery_mask[b, img - 1],
                    x.gallery_global[b, img - 1],
                )
            start = img * block
            is_global = 2 if img == 0 else 1  # query block attends globally
            u[b, start] = glob.double()  # global_dim == hidden: identity projection
            m[b, start] = is_global
            for j in range(n):
                u[b, start + 1 + j] = (
                    lin(loc[j].double(), "local_to_lm") + sd["scale_encoder.weight"][scl[j]]
                )
                m[b, start + 1 + j] = 0 if pad[j] else is_global
            u[b, start + block - 1] = sd[lm + "sep_embedding"]
            m[b, start + block - 1] = 2  # every SEP is global
    pos = sd[lm + "embeddings.position_embeddings.weight"][2 : padded + 2]
    emb = u + pos + sd[lm + "embeddings.token_type_embeddings.weight"][0]
    h = F.layer_norm(
        emb,
        (hidden,),
        sd[lm + "embeddings.LayerNorm.weight"],
        sd[lm + "embeddings.LayerNorm.bias"],
        cfg.layer_norm_eps,
    )
    i = torch.arange(padded)
    band = (i[:, None] - i[None, :]).abs() <= w
    key_local = (band[None] & (m[:, None, :] == 1)) | (m[:, None, :] == 2)  # [B, S, S]
    key_global = (m[:, None, :] != 0).expand(-1, padded, -1)

    def attend(q, k, v, allowed):
        heads = [t.view(batch, padded, nh, d).transpose(1, 2) for t in (q, k, v)]
        scores = heads[0] @ heads[1].transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        return (scores.softmax(-1) @ heads[2]).transpose(1, 2).reshape(batch, padded, hidden)

    def norm(t, name):
        return F.layer_norm(
            t, (hidden,), sd[name + ".weight"], sd[name + ".bias"], cfg.layer_norm_eps
        )

    for layer in range(cfg.num_layers):
        p = f"{lm}encoder.layer.{layer}."
        s = p + "attention.self."
        o = attend(lin(h, s + "query"), lin(h, s + "key"), lin(h, s + "value"), key_local)
        og = attend(
            lin(h, s + "query_global"),
            lin(h, s + "key_global"),
            lin(h, s + "value_global"),
            key_global,
        )
        o = torch.where((m == 2)[..., None], og, o)
        o = o.masked_fill((m == 0)[..., None], 0.0)
        a = norm(lin(o, p + "attention.output.dense") + h, p + "attention.output.LayerNorm")
        f = F.gelu(lin(a, p + "intermediate.dense"))
        h = norm(lin(f, p + "output.dense") + a, p + "output.LayerNorm")
    return lin(h[:, :length], "language_model.classifier")


def test_padded_descriptors_only_change_their_own_token():
    model = random_model()
    inputs = random_inputs(SMALL, batch=1, gallery=4, n=5)
    padded = inputs.gallery_mask[0].nonzero()[-1].tolist()  # (image, local) of a padded row
    valid = (~inputs.gallery_mask[0]).nonzero()[-1].tolist()
    block = 5 + 2
    for backend in ("fast", "hf"):
        with torch.no_grad():
            base = model(inputs, backend=backend).token_logits
            for (img, j), leaks in ((padded, False), (valid, True)):
                changed = LocoreInputs(**vars(inputs))
                changed.gallery_local = inputs.gallery_local.clone()
                changed.gallery_local[0, img, j] += 5.0
                diff = (model(changed, backend=backend).token_logits - base).abs().amax(-1)[0]
                token = (1 + img) * block + 1 + j
                others = torch.cat([diff[:token], diff[token + 1 :]])
                assert diff[token] > 1e-3, backend
                assert (others.max() > 1e-3) == leaks, (backend, leaks)


def test_layout_of_the_official_setting():
    """Reference-spec §10.3: 5,050 tokens, 150 global, padded to 5,120, positions 2..5121."""
    layout = Layout(num_gallery=100, block=50, window=512, query_global=True)
    assert (layout.length, layout.padded_length, layout.num_global) == (5050, 5120, 150)
    flags = layout.global_flags("cpu")
    assert flags.sum() == 150 and flags[:50].all() and flags[99:5050:50].all()
    assert not flags[50:99].any() and not flags[5050:].any()
    valid = torch.ones(1, 5120, dtype=torch.bool)
    valid[:, 5050:] = False
    plan = build_plan(valid, layout, torch.float32)
    assert flags[plan.perm[:150]].all() and not flags[plan.perm[150:]].any()
    assert (plan.perm[150:].diff() > 0).all()  # locals keep their order
    assert torch.equal(plan.perm[plan.inverse], torch.arange(5120))
    # 5,122 position rows (ids 2 .. 5121) hold the 5,120 padded tokens; 102 images do not fit.
    config = LocoreConfig.from_yaml("micro").replace(attention_window=512)
    model = LocoreModel(config).eval()
    with torch.no_grad():
        out = model(random_inputs(config, batch=1, gallery=100, n=48))
    assert out.token_logits.shape == (1, 5050, 2)
    with pytest.raises(UserError, match="need 5634 positions but the model has 5122"):
        model(random_inputs(config, batch=1, gallery=102, n=48))


def test_loss_is_mean_cross_entropy_over_gallery_tokens():
    model = random_model()
    inputs = random_inputs(SMALL, batch=2, gallery=5, n=4, labels=True)
    inputs.positive_mask[0, :2] = torch.tensor([2, 1])  # legacy 2 is a positive too
    with torch.no_grad():
        out = model(inputs)
    blocks = out.token_logits.view(2, 6, 6, 2)[:, 1:]  # drop the query block
    labels = (inputs.positive_mask > 0).long()[:, :, None].expand(-1, -1, 6)
    expected = F.cross_entropy(blocks.reshape(-1, 2), labels.reshape(-1))
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_recalls_count_lists_with_a_positive_in_the_top_k():
    scores = {"max-end": torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])}
    positives = torch.tensor([[0, 0, 1], [1, 0, 0]])
    got = recalls(scores, positives)
    assert got["max-end/recall@1"] == 0.0  # list 0: best is id 0; list 1: best is id 1
    assert got["max-end/recall@5"] == got["max-end/recall@10"] == 1.0
    assert recalls(scores, torch.tensor([[0, 0, 1], [0, 1, 0]]))["max-end/recall@1"] == 0.5


def test_training_gradients_match_between_backends():
    """Backward doubles the chain of the forward: 2 x (8 per layer + 3) reductions of <= 64
    terms, 2.7e-5 (float32 bound) of the largest gradient of any parameter: some gradients are
    sums that cancel (a key bias's is exactly 0), so their rounding is that of the large terms."""
    config = SMALL.replace(dropout=0.0)
    inputs = random_inputs(config, batch=2, gallery=4, n=5, labels=True)
    grads = {}
    for backend in ("fast", "hf"):
        model = random_model(config).train()
        model(inputs, backend=backend).loss.backward()
        grads[backend] = {k: p.grad for k, p in model.named_parameters()}
    tol = float32_bound(2 * (8 * config.num_layers + 3), 64) * max(
        map(max_abs, grads["hf"].values())
    )
    for name, g in grads["hf"].items():
        assert_close(grads["fast"][name], g, tol, name)
    query_global = "language_model.longformer.encoder.layer.0.attention.self.query_global.weight"
    assert grads["fast"][query_global].abs().sum() > 0


def test_dropout_only_in_training_mode():
    model = random_model()
    inputs = random_inputs(SMALL, batch=1, gallery=3, n=4)
    with torch.no_grad():
        assert torch.equal(model(inputs).token_logits, model(inputs).token_logits)
        model.train()
        assert not torch.equal(model(inputs).token_logits, model(inputs).token_logits)


def test_half_precision_fast_path():
    model = random_model()
    inputs = random_inputs(SMALL, batch=2, gallery=5, n=4)
    with torch.no_grad():
        ref = model(inputs).token_logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(inputs).token_logits
        half = model.to(torch.bfloat16)(inputs).token_logits
    scale = ref.abs().max()
    assert half.dtype == autocast.dtype == torch.float32  # logits are returned in float32
    assert (half - ref).abs().max() < 0.1 * scale
    assert (autocast - ref).abs().max() < 0.1 * scale


def test_fast_forward_compiles_without_graph_breaks():
    """No host syncs or data-dependent shapes: dynamo captures the whole forward."""
    model = random_model()
    inputs = random_inputs(SMALL, batch=2, gallery=5, n=4)
    explained = torch._dynamo.explain(lambda x: model(x).scores["max-end"])(inputs)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_backend_selection_and_bad_inputs():
    model = build_model("micro")
    assert model.config.backend == "fast" and model.config.local_dim == 112
    model.set_backend("hf")
    assert model.config.backend == "hf"
    with pytest.raises(UserError, match="unknown locore backend 'flash'"):
        model.set_backend("flash")
    config = SMALL.replace(max_positions=40)
    model = LocoreModel(config)
    with pytest.raises(UserError, match="need 50 positions but the model has 40"):
        model(random_inputs(config, batch=1, gallery=5, n=5))  # 42 tokens -> 48, ids from 2
    inputs = random_inputs(SMALL, batch=1, gallery=2, n=3)
    with pytest.raises(UserError, match="local descriptors are 24-D but the model expects"):
        LocoreModel(SMALL.replace(local_dim=16))(inputs)
    inputs.gallery_global = None
    with pytest.raises(UserError, match="pass query_global and gallery_global"):
        LocoreModel(SMALL)(inputs)
