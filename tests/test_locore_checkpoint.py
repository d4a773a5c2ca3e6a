"""LoCoRe checkpoints: the official 273-key layout (strict), our folders, presets, Hub ids."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from locore.core.errors import UserError
from locore.rerank.locore import LocoreConfig, LocoreInputs, LocoreModel, build_model
from locore.rerank.locore import checkpoint as ckpt
from locore.rerank.train.init import init_from_longformer

# A small architecture written with the official key names (reference-spec §4.13).
SMALL = LocoreConfig(
    hidden_size=16,
    num_layers=2,
    num_heads=2,
    intermediate_size=24,
    attention_window=8,
    max_positions=80,
    local_dim=16,
    global_dim=16,
)


def official_layout(layers: int, hidden: int, ffn: int, positions: int) -> dict[str, tuple]:
    """The released checkpoint's keys and shapes (spec §4.13 table), written out by hand."""
    lm = "language_model.longformer."
    keys = {
        lm + "sep_embedding": (hidden,),
        lm + "pad_embedding": (hidden,),
        lm + "embeddings.position_embeddings.weight": (positions, hidden),
        lm + "embeddings.token_type_embeddings.weight": (1, hidden),
        lm + "embeddings.LayerNorm.weight": (hidden,),
        lm + "embeddings.LayerNorm.bias": (hidden,),
        "language_model.classifier.weight": (2, hidden),
        "language_model.classifier.bias": (2,),
        "scale_encoder.weight": (3, hidden),
    }
    for i in range(layers):
        p = f"{lm}encoder.layer.{i}."
        for name in ("query", "key", "value", "query_global", "key_global", "value_global"):
            keys[f"{p}attention.self.{name}.weight"] = (hidden, hidden)
            keys[f"{p}attention.self.{name}.bias"] = (hidden,)
        keys[f"{p}attention.output.dense.weight"] = (hidden, hidden)
        keys[f"{p}attention.output.dense.bias"] = (hidden,)
        keys[f"{p}intermediate.dense.weight"] = (ffn, hidden)
        keys[f"{p}intermediate.dense.bias"] = (ffn,)
        keys[f"{p}output.dense.weight"] = (hidden, ffn)
        keys[f"{p}output.dense.bias"] = (hidden,)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            keys[f"{p}{ln}.weight"] = (hidden,)
            keys[f"{p}{ln}.bias"] = (hidden,)
    return keys


def random_tensors(layout: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) * 0.2 for k, shape in layout.items()}


def meta_state(config: LocoreConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return LocoreModel(config).state_dict()


def inputs_for(config: LocoreConfig, gallery: int = 3, n: int = 4) -> LocoreInputs:
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(1, gallery, n, generator=gen) < 0.3
    return LocoreInputs(
        query_local=torch.randn(1, n, config.local_dim, generator=gen),
        query_scales=torch.zeros(1, n, dtype=torch.long),
        query_mask=torch.zeros(1, n, dtype=torch.bool),
        gallery_local=torch.randn(1, gallery, n, config.local_dim, generator=gen),
        gallery_scales=torch.zeros(1, gallery, n, dtype=torch.long),
        gallery_mask=mask,
        query_global=torch.randn(1, config.global_dim, generator=gen),
        gallery_global=torch.randn(1, gallery, config.global_dim, generator=gen),
    )


def test_base_architecture_has_the_official_273_keys():
    state = meta_state(LocoreConfig())
    assert {k: tuple(v.shape) for k, v in state.items()} == official_layout(12, 768, 3072, 5122)
    assert len(state) == 273
    assert sum(v.numel() for v in state.values()) == 110_257_154


@pytest.mark.parametrize(
    ("config", "tensors", "params", "extra"),
    [
        # Variants of reference-spec §4.13 (counts verified against the official module).
        (LocoreConfig.from_yaml("base_cvnet"), 277, 112_617_986, "global_to_lm.weight"),
        (
            LocoreConfig(local_dim=1024, global_dim=2048, use_global=False),
            275,
            111_044_354,
            "local_to_lm.weight",
        ),
        (LocoreConfig.from_yaml("small"), 141, 57_099_266, None),
        (
            LocoreConfig(num_layers=6, hidden_size=256, num_heads=8, intermediate_size=1024),
            145,
            7_630_338,
            "global_to_lm.weight",
        ),
        (LocoreConfig(bottleneck_dim=128), 281, 110_652_162, "local_to_lm.1.weight"),
        (
            LocoreConfig(bottleneck_dim=128, linear_activation="relu"),
            281,
            110_652_162,
            "local_to_lm.2.weight",
        ),
        (LocoreConfig(force_linear=True), 277, 111_438_338, "global_to_lm.bias"),
    ],
)
def test_variant_key_counts(config, tensors, params, extra):
    state = meta_state(config)
    assert (len(state), sum(v.numel() for v in state.values())) == (tensors, params)
    assert extra is None or extra in state


def test_presets():
    tiny = LocoreConfig.from_yaml("tiny")
    assert (tiny.num_layers, tiny.hidden_size, tiny.attention_window) == (4, 512, 1024)
    assert sum(v.numel() for v in meta_state(tiny).values()) == 19_176_450  # paper: 19.4M
    micro = LocoreConfig.from_yaml("locore_micro")
    assert 100_000 < sum(v.numel() for v in meta_state(micro).values()) < 1_000_000
    assert build_model("micro", num_layers=1).config.num_layers == 1
    with pytest.raises(UserError, match="unknown locore preset 'huge'; choose one of"):
        LocoreConfig.from_yaml("huge")
    with pytest.raises(UserError, match="unknown config key hidden"):
        LocoreConfig().replace(hidden=3)


def test_official_file_loads_strictly(tmp_path):
    tensors = random_tensors(official_layout(2, 16, 24, 80))
    path = tmp_path / "locore_base.safetensors"
    save_file(tensors, path)
    model = LocoreModel.from_pretrained(path, config=SMALL, backend="hf")
    assert model.config.backend == "hf" and not model.training
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in tensors.items())

    # A folder holding the official file and an official Longformer config.json loads too.
    longformer = {
        "model_type": "longformer",
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 24,
        "attention_window": [8, 8],
        "max_position_embeddings": 80,
        "type_vocab_size": 1,
        "layer_norm_eps": 1e-5,
        "vocab_size": 50265,
    }
    (tmp_path / "config.json").write_text(json.dumps(longformer))
    # Descriptor widths are not in a Longformer config: the default 768 needs projections.
    with pytest.raises(UserError, match=r"missing \(4\): global_to_lm\.bias, global_to_lm"):
        LocoreModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({**longformer, "local_dim": 16, "global_dim": 16})
    )
    again = LocoreModel.from_pretrained(tmp_path)
    assert again.config == SMALL
    with torch.no_grad():
        x = inputs_for(SMALL)
        assert torch.equal(again(x).token_logits, model(x, backend="fast").token_logits)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.pop("language_model.longformer.encoder.layer.1.attention.self.key.bias"),
            r"missing \(1\): language_model\.longformer\.encoder\.layer\.1\.attention\.self\.key"
            r"\.bias",
        ),
        (
            lambda t: t.update(
                {"language_model.longformer.embeddings.word_embeddings.weight": torch.zeros(4, 16)}
            ),
            r"unexpected \(1\): language_model\.longformer\.embeddings\.word_embeddings\.weight",
        ),
        (
            lambda t: t.update({"scale_encoder.weight": torch.zeros(5, 16)}),
            r"shape checkpoint vs model \(1\): scale_encoder\.weight \[5, 16\] vs \[3, 16\]",
        ),
    ],
)
def test_strict_loading_names_every_difference(tmp_path, edit, message):
    tensors = random_tensors(official_layout(2, 16, 24, 80))
    edit(tensors)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path)
    with pytest.raises(UserError, match=message) as err:
        LocoreModel.from_pretrained(path, config=SMALL)
    assert "\n" not in str(err.value)


def test_default_architecture_is_base_and_mismatch_is_listed(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(random_tensors(official_layout(2, 16, 24, 80)), path)
    with pytest.raises(UserError, match=r"missing \(220\): .* \.\.\.; shape") as err:
        LocoreModel.from_pretrained(path)  # no config: the 12-layer base is expected
    # Every 2-layer tensor but the classifier bias ([2] in any width) has the wrong shape.
    assert "shape checkpoint vs model (52): " in str(err.value)


def test_save_and_load_round_trip(tmp_path):
    model = build_model(SMALL.replace(local_dim=12, bottleneck_dim=6, linear_activation="tanh"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "mine")
    assert json.loads((tmp_path / "mine" / "config.json").read_text())["model_type"] == "locore"
    loaded = LocoreModel.from_pretrained(tmp_path / "mine", backend="hf")
    assert loaded.config == model.config.replace(backend="hf")
    x = inputs_for(model.config)
    with torch.no_grad():
        assert torch.equal(loaded(x, backend="fast").token_logits, model(x).token_logits)
    # The weights file alone is the official layout plus our projection keys.
    assert (
        len(ckpt.read_weights(tmp_path / "mine" / "model.safetensors"))
        == len(official_layout(2, 16, 24, 80)) + 8
    )


def test_hub_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    model = build_model(SMALL)
    model.save_pretrained(tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    loaded = LocoreModel.from_pretrained("someone/locore_tiny")
    assert calls == [("someone/locore_tiny", ["*.safetensors", "*.json"])]
    assert loaded.config == model.config


def test_bad_sources_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="'micro' is an architecture preset without weights"):
        LocoreModel.from_pretrained("micro")
    with pytest.raises(UserError, match="not found"):
        LocoreModel.from_pretrained(tmp_path / "nothing" / "here.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        LocoreModel.from_pretrained(junk)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds 0 .safetensors files"):
        LocoreModel.from_pretrained(empty)
    (empty / "model.safetensors").write_bytes(junk.read_bytes())
    (empty / "config.json").write_text('{"model_type": "locore", "hidden_sise": 8}')
    with pytest.raises(UserError, match="unknown config key hidden_sise"):
        LocoreModel.from_pretrained(empty)


def test_init_from_longformer_fixes_the_sep_and_pad_vectors():
    """P10: SEP/PAD start from the pretrained ``</s>``/``<pad>`` rows; positions are tiled."""
    from transformers import LongformerConfig, LongformerModel

    def pretrained(ffn: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        config = LongformerConfig(
            vocab_size=10,
            hidden_size=16,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=ffn,
            attention_window=8,
            max_position_embeddings=20,
            type_vocab_size=1,
        )
        hf = LongformerModel(config, add_pooling_layer=False)
        return {"longformer." + k: v for k, v in hf.state_dict().items()}

    source = pretrained(ffn=24)
    model = build_model(SMALL)  # 2 of the 3 layers, 80 position rows
    init_from_longformer(model, source)
    state = model.state_dict()
    lm = "language_model.longformer."
    words = source["longformer.embeddings.word_embeddings.weight"]
    assert torch.equal(state[lm + "sep_embedding"], words[2])
    assert torch.equal(state[lm + "pad_embedding"], words[1])
    key = "encoder.layer.1.attention.self.key_global.weight"
    assert torch.equal(state[lm + key], source["longformer." + key])
    positions = source["longformer.embeddings.position_embeddings.weight"]
    ours = state[lm + "embeddings.position_embeddings.weight"]
    assert torch.equal(ours[:20], positions) and torch.equal(ours[20:38], positions[2:])
    with pytest.raises(
        UserError, match=r"shape checkpoint vs model \(6\): encoder\.layer\.0\.intermediate"
    ):
        init_from_longformer(model, pretrained(ffn=32))
