"""Training init: scratch, our checkpoint, tiny Longformer / RoBERTa folders (P10, positions)."""

from __future__ import annotations

import pytest
import torch
from transformers import LongformerConfig, LongformerModel, RobertaConfig, RobertaModel

from locore.core.errors import UserError
from locore.rerank.locore.model import build_model
from locore.rerank.train.init import init_model

SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _save(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "longformer":
        config = LongformerConfig(
            **SHAPE, max_position_embeddings=34, attention_window=[8, 8], vocab_size=50
        )
        model = LongformerModel(config, add_pooling_layer=False)
    else:
        config = RobertaConfig(**SHAPE, max_position_embeddings=34, vocab_size=50)
        model = RobertaModel(config, add_pooling_layer=False)
    model.save_pretrained(tmp_path / kind)  # model.safetensors + config.json, no network
    return tmp_path / kind, model.state_dict()


@pytest.mark.parametrize("kind", ["longformer", "roberta"])
def test_pretrained_init_copies_weights_extends_positions_and_sets_sep(tmp_path, kind):
    folder, source = _save(tmp_path, kind)
    model = init_model("micro", str(folder))
    cfg, state = model.config, model.state_dict()
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size) == (32, 2, 2, 64)
    assert cfg.local_dim == 112 and cfg.max_positions == 5122 and model.training
    words = source["embeddings.word_embeddings.weight"]
    backbone = "language_model.longformer."
    # P10: SEP / pad are the pretrained </s> and <pad> rows, not uninitialised memory.
    assert torch.equal(state[backbone + "sep_embedding"], words[2])
    assert torch.equal(state[backbone + "pad_embedding"], words[1])
    old = source["embeddings.position_embeddings.weight"]  # 34 rows: 2 reserved + 32
    new = state[backbone + "embeddings.position_embeddings.weight"]
    assert new.shape == (5122, 32) and torch.equal(new[:34], old)
    assert torch.equal(new[2 + 32 * 100 + 5], old[2 + 5])  # copies of the pretrained rows
    layer = "encoder.layer.1.attention.self."
    assert torch.equal(state[backbone + layer + "query.weight"], source[layer + "query.weight"])
    global_source = "query.weight" if kind == "roberta" else "query_global.weight"
    assert torch.equal(
        state[backbone + layer + "query_global.weight"], source[layer + global_source]
    )
    assert torch.equal(
        state[backbone + "encoder.layer.0.output.dense.bias"],
        source["encoder.layer.0.output.dense.bias"],
    )


def test_init_layers_keeps_the_first_layers(tmp_path):
    folder, source = _save(tmp_path, "longformer")
    from locore.rerank.train.init import init_model as init

    model = init("micro", str(folder), layers=1)
    assert model.config.num_layers == 1
    with pytest.raises(UserError, match="init_layers=3"):
        init("micro", str(folder), layers=3)


def test_scratch_and_our_checkpoint(tmp_path):
    torch.manual_seed(0)
    a = init_model("micro")
    torch.manual_seed(0)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), build_model("micro").parameters()))
    a.save_pretrained(tmp_path / "ours")
    b = init_model("micro", str(tmp_path / "ours"), backend="hf")
    assert b.training and b.config.backend == "hf"
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    small = init_model("micro", overrides={"local_dim": 32, "num_local": 8})
    assert small.config.local_dim == 32


def test_identity_start_sets_the_attention_maps_and_nothing_else():
    torch.manual_seed(0)
    plain = dict(init_model("micro").named_parameters())
    torch.manual_seed(0)
    model = init_model("micro", "scratch-identity")
    assert model.training
    changed = set()
    for name, param in model.named_parameters():
        if not torch.equal(param, plain[name]):
            changed.add(name)
    maps = {
        f"language_model.longformer.encoder.layer.{i}.attention.self.{m}.weight"
        for i in range(model.config.num_layers)
        for m in ("query", "key", "query_global", "key_global")
    }
    assert changed == maps
    for name in maps:
        assert torch.equal(dict(model.named_parameters())[name], torch.eye(64))
    # so attention logits start as embedding dot products: q . k = x . y
    attn = model.language_model.longformer.encoder.layer[0].attention.self
    x, y = torch.randn(2, 64).unbind()
    assert torch.allclose(attn.query(x) @ attn.key(y), x @ y, rtol=1e-5, atol=1e-5)


def test_bad_init_sources(tmp_path):
    with pytest.raises(UserError, match="neither 'scratch'"):
        init_model("micro", "no such thing")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UserError, match="model_type 'bert'"):
        init_model("micro", str(tmp_path / "bert"))
