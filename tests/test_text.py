"""Text encoder and tokenizer: ids equal open_clip's, embeddings equal the original ModelScope embedder's.

References: `open_clip.tokenize`; open_clip's CLIP model read at its penultimate layer (a) the way
ModelScope's `FrozenOpenCLIPEmbedder` does it, running that class's own code (it was written for
open_clip 2.x's sequence-first transformer, so it gets one), and (b) written out for open_clip 3.x's
batch-first transformer. Tiny towers, every parameter perturbed, fp32.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import types
from pathlib import Path

import pytest
import torch

from modelscope_t2v.formats.tables import ConversionError, apply_table
from modelscope_t2v.formats.text_layout import (
    clip_text_to_open_clip,
    diffusers_text_ignored,
    diffusers_text_table,
    open_clip_ignored,
    open_clip_text_table,
    open_clip_to_clip_text,
    text_config_from_open_clip,
    text_config_to_diffusers,
    text_encoder_from_open_clip,
)
from modelscope_t2v.models.text import TEXT_PRESETS, build_text_encoder, build_tokenizer, save_tokenizer, tokenize
from refs import max_diff, perturb_

open_clip = pytest.importorskip("open_clip")

TOL = 1e-4

PROMPTS = [
    "A panda eating bamboo on a rock.",
    "",
    "Hello, World!!! (test) #tag @user 3.14 $5 -- it's we've I'm",
    "  spaces   and\ttabs\n",
    "café naïve, Zürich, 東京 & Москва, emoji 🐼🎬",
    "“curly quotes” Tom &amp; Jerry ＦＵＬＬ ｗｉｄｔｈ ﬁne",  # changed by open_clip's text cleaning
    "a red balloon " * 40,  # > 77 tokens: truncated, still ends with <|endoftext|>
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_matches_open_clip(tokenizer):
    ours = tokenize(tokenizer, PROMPTS)
    ref = open_clip.tokenize(PROMPTS)
    assert ours.dtype == torch.long and ours.shape == (len(PROMPTS), 77)
    assert torch.equal(ours, ref)
    assert tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0
    assert ours[1, :3].tolist() == [49406, 49407, 0]  # "" -> sot, eot, padding
    assert ours[-1, -1].item() == 49407 and (ours[-1] != 0).all()  # truncated, eot kept at the end


def test_tokenize_diffusers_mode_differs_on_exclamation_marks(tokenizer):
    # diffusers calls the tokenizer on raw text, where the pad token "!" is a special token: each "!"
    # becomes id 0. match="open_clip" encodes it as text, as open_clip (and the training) did.
    prompt = ["wow! a cat"]
    diffusers_ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(tokenize(tokenizer, prompt, match="diffusers"), diffusers_ids)
    assert torch.equal(tokenize(tokenizer, prompt), open_clip.tokenize(prompt))
    assert diffusers_ids[0, 2].item() == 0 and tokenize(tokenizer, prompt)[0, 2].item() == 256  # "!</w>"
    with pytest.raises(ValueError, match="match"):
        tokenize(tokenizer, prompt, match="hf")
    with pytest.raises(TypeError, match="prompts"):
        tokenize(tokenizer, [1, 2])


def test_save_tokenizer_round_trip(tokenizer, tmp_path):
    save_tokenizer(tokenizer, str(tmp_path / "tokenizer"))
    names = sorted(p.name for p in (tmp_path / "tokenizer").iterdir())
    assert names == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    config = json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["pad_token"] == "!" and config["model_max_length"] == 77
    again = build_tokenizer(str(tmp_path / "tokenizer"))
    assert torch.equal(tokenize(again, PROMPTS), tokenize(tokenizer, PROMPTS))
    assert torch.equal(tokenize(again, PROMPTS, match="diffusers"), tokenize(tokenizer, PROMPTS, match="diffusers"))


def test_build_tokenizer_rejects_wrong_padding(tokenizer, tmp_path):
    folder = tmp_path / "tokenizer"
    save_tokenizer(tokenizer, str(folder))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = json.loads((folder / name).read_text())
        data["pad_token"] = "<|endoftext|>"  # the SD 1.x tokenizer's choice
        (folder / name).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="path"):
        build_tokenizer(str(folder))
    with pytest.raises(FileNotFoundError, match="path"):
        build_tokenizer(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------------
# Parity with open_clip / the original ModelScope embedder


def _tiny_open_clip(width: int, heads: int, layers: int, seed: int):
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=width, heads=heads, layers=layers),
    )
    return perturb_(model, seed=seed).eval()


def _penultimate_batch_first(model, tokens):
    """ModelScope's penultimate read-out, for open_clip 3.x's batch-first text transformer."""
    x = model.token_embedding(tokens) + model.positional_embedding  # b l d
    for block in model.transformer.resblocks[:-1]:
        x = block(x, attn_mask=model.attn_mask)  # b l d
    return model.ln_final(x)


def _modelscope_embedder_class(fake_open_clip):
    """`FrozenOpenCLIPEmbedder`, compiled from the installed modelscope source (its module imports the
    whole modelscope package, so the class is lifted out alone) against a stand-in open_clip module."""
    spec = importlib.util.find_spec("modelscope")
    path = Path(spec.submodule_search_locations[0]) / "models/multi_modal/video_synthesis/text_to_video_synthesis_model.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FrozenOpenCLIPEmbedder")
    namespace = {"torch": torch, "open_clip": fake_open_clip}
    exec(compile(ast.Module(body=[cls], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["FrozenOpenCLIPEmbedder"]


def _modelscope_embedder(model):
    """The original embedder around `model`, whose text transformer is made sequence-first (open_clip
    2.x, which the original's permutes were written for) with the same weights."""
    seq_first = copy.deepcopy(model)
    t = model.transformer
    seq_first.transformer = open_clip.transformer.Transformer(t.width, t.layers, t.resblocks[0].attn.num_heads, batch_first=False)
    seq_first.transformer.load_state_dict(t.state_dict())
    fake = types.SimpleNamespace(
        create_model_and_transforms=lambda arch, device, pretrained: (seq_first, None, None),
        tokenize=open_clip.tokenize,
    )
    return _modelscope_embedder_class(fake)(device="cpu", layer="penultimate").eval()


@torch.no_grad()
def test_parity_with_modelscope_embedder(tokenizer):
    clip = _tiny_open_clip(width=128, heads=2, layers=3, seed=0)
    state = clip.state_dict()  # the whole model: vision tower, text_projection, logit_scale included
    state["attn_mask"] = clip.attn_mask  # some files carry the causal mask buffer
    config = text_config_from_open_clip(state)  # 128 wide -> 2 heads; 3 blocks, last dropped -> 2 layers
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (128, 2, 2)
    assert config.intermediate_size == 512 and config.max_position_embeddings == 77
    table = open_clip_text_table(config, layers_in_file=3)
    encoder = build_text_encoder(config)
    shapes = {k: v.shape for k, v in encoder.state_dict().items()}
    converted = apply_table(state, table, shapes, ignore=lambda k: open_clip_ignored(k, config))
    encoder.load_state_dict(converted, strict=True)

    prompts = PROMPTS[:3] + PROMPTS[-1:]
    ids = tokenize(tokenizer, prompts)
    ours = encoder(ids)[0]
    ref_original = _modelscope_embedder(clip)(prompts)  # the original code, text in, features out
    ref_batch_first = _penultimate_batch_first(clip, open_clip.tokenize(prompts))
    d_original, d_batch_first = max_diff(ours, ref_original), max_diff(ours, ref_batch_first)
    print(f"text parity: max|diff| vs FrozenOpenCLIPEmbedder {d_original:.2e}, vs batch-first loop {d_batch_first:.2e}")
    assert ours.shape == (4, 77, 128)
    assert d_original <= TOL and d_batch_first <= TOL
    # The last block is really skipped: the full tower differs.
    assert max_diff(ours, clip.ln_final(clip.transformer(clip.token_embedding(ids) + clip.positional_embedding,
                                                         attn_mask=clip.attn_mask))) > 1e-2  # fmt: skip


@torch.no_grad()
def test_heads_override_for_narrow_towers(tokenizer):
    clip = _tiny_open_clip(width=32, heads=4, layers=2, seed=1)
    state = clip.state_dict()
    ids = tokenize(tokenizer, PROMPTS[:2])
    ref = _penultimate_batch_first(clip, ids)
    ours = text_encoder_from_open_clip(state, heads=4)(ids)[0]
    assert max_diff(ours, ref) <= TOL
    assert max_diff(text_encoder_from_open_clip(state)(ids)[0], ref) > 1e-3  # 1 head (the rule) is another model
    with pytest.raises(ValueError, match="heads"):
        text_config_from_open_clip(state, heads=5)


@torch.no_grad()
def test_round_trip_through_open_clip_layout(tokenizer):
    config = build_text_encoder("tiny").config
    encoder = perturb_(build_text_encoder(config), seed=2)
    state = encoder.state_dict()
    tower = clip_text_to_open_clip(state, config)
    assert sorted(tower) == sorted(open_clip_text_table_keys(config))
    # The written text tower holds exactly the used layers, and the config comes back from it.
    again = text_config_from_open_clip(tower)
    for key, value in TEXT_PRESETS["tiny"].items():
        if key != "projection_dim":
            assert getattr(again, key) == value, key
    back = open_clip_to_clip_text(tower, again)
    assert sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)

    # The written tower is a real open_clip text tower: open_clip runs it (all layers) to the same features.
    clip = _tiny_open_clip(width=32, heads=1, layers=config.num_hidden_layers, seed=3)
    missing, unexpected = clip.load_state_dict(tower, strict=False)
    assert not unexpected and all(k.startswith(("visual.", "text_projection", "logit_scale")) for k in missing)
    ids = tokenize(tokenizer, PROMPTS[:2])
    x = clip.transformer(clip.token_embedding(ids) + clip.positional_embedding, attn_mask=clip.attn_mask)
    assert max_diff(encoder(ids)[0], clip.ln_final(x)) <= TOL


def open_clip_text_table_keys(config):
    keys = []
    for rule in open_clip_text_table(config, config.num_hidden_layers):
        keys += [rule.src] if isinstance(rule.src, str) else list(rule.src)
    return keys


def test_conversion_is_strict():
    clip = _tiny_open_clip(width=32, heads=1, layers=3, seed=4)
    state = clip.state_dict()
    config = text_config_from_open_clip(state)
    broken = {k: v for k, v in state.items() if k != "transformer.resblocks.1.mlp.c_fc.bias"}
    with pytest.raises(ConversionError, match="resblocks.1.mlp.c_fc.bias"):
        open_clip_to_clip_text(broken, config)
    extra = dict(state, **{"transformer.resblocks.3.ln_1.weight": state["ln_final.weight"]})
    with pytest.raises(ValueError, match="layers_in_file"):
        open_clip_to_clip_text(extra, config)  # 4 blocks cannot fill 2 layers
    with pytest.raises(ConversionError, match="unexpected"):
        open_clip_to_clip_text(dict(state, mystery=torch.zeros(1)), config)
    with pytest.raises(ValueError, match="config"):
        build_text_encoder("huge")


# ---------------------------------------------------------------------------------------------------
# Sizes and the diffusers layout


def test_released_parameter_count():
    with torch.device("meta"):
        encoder = build_text_encoder("ms-1.7b")
    n = sum(p.numel() for p in encoder.parameters())
    assert round(n / 1e6, 1) == 340.4, n
    assert (encoder.config.num_hidden_layers, encoder.config.hidden_size, encoder.config.num_attention_heads) == (23, 1024, 16)


@torch.no_grad()
def test_diffusers_config_loads_with_transformers(tokenizer, tmp_path):
    from transformers import CLIPTextModel

    encoder = perturb_(build_text_encoder("tiny"), seed=5)
    encoder.save_pretrained(tmp_path)
    written = text_config_to_diffusers(encoder.config)
    (tmp_path / "config.json").write_text(json.dumps(written, indent=2))
    loaded = CLIPTextModel.from_pretrained(tmp_path).eval()
    for key, value in TEXT_PRESETS["tiny"].items():
        assert getattr(loaded.config, key) == value, key
    ids = tokenize(tokenizer, PROMPTS[:2])
    assert torch.equal(loaded(ids)[0], encoder(ids)[0])
    # A config.json as released (bookkeeping keys included) builds the same model.
    released = dict(written, _name_or_path="x", dropout=0.0, transformers_version="4.25.0.dev0")
    rebuilt = build_text_encoder(released).config
    assert all(getattr(rebuilt, k) == v for k, v in TEXT_PRESETS["tiny"].items())
    assert text_config_to_diffusers(build_text_encoder(loaded.config.to_dict()).config) == written
    with pytest.raises(ValueError, match="hidden_sise"):
        build_text_encoder(dict(written, hidden_sise=8))


@torch.no_grad()
def test_diffusers_released_keys(tokenizer):
    encoder = perturb_(build_text_encoder("tiny"), seed=6)
    config = encoder.config
    # The released model.safetensors: keys under "text_model.", plus the position_ids buffer.
    prefix = "" if hasattr(encoder, "text_model") else "text_model."
    released = {prefix + k: v for k, v in encoder.state_dict().items()}
    released["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    shapes = {k: v.shape for k, v in encoder.state_dict().items()}
    state = apply_table(released, diffusers_text_table(config), shapes, ignore=diffusers_text_ignored)
    again = build_text_encoder(config)
    again.load_state_dict(state, strict=True)
    ids = tokenize(tokenizer, PROMPTS[:1])
    assert torch.equal(again(ids)[0], encoder(ids)[0])
