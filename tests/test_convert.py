"""convert_weights.py: layout round trips bit for bit, and the converted folders run in the references."""

from __future__ import annotations

import pytest
import torch

from checkpoints import (
    TINY_ORIGINAL_UNET,
    make_diffusers_checkpoint,
    make_modelscope_checkpoint,
    open_clip_tiny,
    original_autoencoder,
    original_text_features,
    original_unet,
)
from convert_weights import main as convert_main
from modelscope_t2v.formats import convert_checkpoint
from modelscope_t2v.formats.safe_pickle import safe_torch_load
from modelscope_t2v.formats.tables import ConversionError, Fuse, Rename, Split, apply_table, invert
from refs import max_diff

PROMPTS = ["a blue square moving up", "a cat"]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return make_modelscope_checkpoint(tmp_path_factory.mktemp("orig") / "ms")


def _text_tower(state):
    return {k: v for k, v in state.items() if not k.startswith(("visual.", "text_projection", "logit_scale"))}


def test_original_to_diffusers_to_original_is_bit_exact(original, tmp_path):
    folder, _ = original
    convert_checkpoint(folder, tmp_path / "diff", "diffusers", progress=False)
    convert_checkpoint(tmp_path / "diff", tmp_path / "back", "modelscope", progress=False)

    unet_a = safe_torch_load(folder / "text2video_pytorch_model.pth")
    unet_b = safe_torch_load(tmp_path / "back" / "text2video_pytorch_model.pth")
    assert unet_a.keys() == unet_b.keys()
    assert all(torch.equal(unet_a[k], unet_b[k]) and unet_a[k].dtype == unet_b[k].dtype for k in unet_a)

    vae_a = {k: v for k, v in safe_torch_load(folder / "VQGAN_autoencoder.pth")["state_dict"].items()
             if k.startswith("first_stage_model.")}
    vae_b = safe_torch_load(tmp_path / "back" / "VQGAN_autoencoder.pth")["state_dict"]
    assert vae_a.keys() == vae_b.keys()
    assert all(torch.equal(vae_a[k], vae_b[k]) for k in vae_a)

    # The diffusers layout holds the 23 used layers of the text tower: those come back exactly; the
    # unused last block, projection and vision tower are not part of the diffusers layout.
    clip_a = _text_tower(safe_torch_load(folder / "open_clip_pytorch_model.bin"))
    last = max(int(k.split(".")[2]) for k in clip_a if k.startswith("transformer.resblocks."))
    clip_a = {k: v for k, v in clip_a.items() if not k.startswith(f"transformer.resblocks.{last}.")}
    clip_b = safe_torch_load(tmp_path / "back" / "open_clip_pytorch_model.bin")
    assert clip_a.keys() == clip_b.keys()
    assert all(torch.equal(clip_a[k], clip_b[k]) for k in clip_a)


def test_diffusers_runs_the_converted_folder(original, tmp_path, record_property):
    from diffusers import TextToVideoSDPipeline as Ref

    folder, refs = original
    convert_main([str(folder), str(tmp_path / "diff"), "--to", "diffusers", "--quiet"])
    pipe = Ref.from_pretrained(tmp_path / "diff")
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 3, 8, 8, generator=g), torch.tensor([5, 900]), torch.randn(2, 7, 1024, generator=g)
    img, z = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        figures = dict(
            unet=max_diff(pipe.unet(x, t, encoder_hidden_states=ctx).sample, refs["unet"](x, t, ctx)),
            vae_encode=max_diff(pipe.vae.encode(img).latent_dist.mean, refs["vae"].encode(img).mean),
            vae_decode=max_diff(pipe.vae.decode(z).sample, refs["vae"].decode(z)),
            text=max_diff(pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0], original_text_features(refs["clip"], PROMPTS)),
        )
    record_property("diffusers_on_converted", figures)
    assert max(figures.values()) <= 1e-4, figures
    assert pipe.tokenizer.pad_token == "!" and pipe.tokenizer.pad_token_id == 0
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.steps_offset == 1


def test_diffusers_to_modelscope_loads_in_the_original_modules(tmp_path):
    import open_clip

    from diffusers import TextToVideoSDPipeline as Ref

    # The original UNetSD hard-codes a 1024-wide context in its decoder and GroupNorm(32).
    src = make_diffusers_checkpoint(tmp_path / "src", seed=3, unet=TINY_ORIGINAL_UNET)
    ref = Ref.from_pretrained(src)
    convert_checkpoint(src, tmp_path / "ms", "modelscope", progress=False)
    unet = original_unet(_tiny_as_original(tmp_path / "ms"))
    unet.load_state_dict(torch.load(tmp_path / "ms" / "text2video_pytorch_model.pth"), strict=True)
    vae = original_autoencoder()
    vae.init_from_ckpt(str(tmp_path / "ms" / "VQGAN_autoencoder.pth"))  # the original's own reader
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(1, 4, 2, 8, 8, generator=g), torch.tensor([400]), torch.randn(1, 5, 1024, generator=g)
    z = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        assert max_diff(unet.eval()(x, t, ctx), ref.unet(x, t, encoder_hidden_states=ctx).sample) <= 1e-4
        assert max_diff(vae.eval().decode(z), ref.vae.decode(z).sample) <= 1e-4
    # The text tower file: open_clip's text modules read it (the vision tower is not in the source).
    clip = open_clip_tiny(width=32, layers=2, mlp_ratio=4)  # the tiny text preset's shape
    missing, unexpected = clip.load_state_dict(torch.load(tmp_path / "ms" / "open_clip_pytorch_model.bin"), strict=False)
    assert not unexpected and all(k.startswith(("visual.", "text_projection", "logit_scale")) for k in missing)
    tokens = open_clip.tokenize(PROMPTS)
    x = clip.token_embedding(tokens) + clip.positional_embedding
    for r in clip.transformer.resblocks:  # every stored block is a used one
        x = r(x, attn_mask=clip.attn_mask)
    with torch.no_grad():
        assert max_diff(clip.ln_final(x), ref.encode_prompt(PROMPTS, "cpu", 1, False)[0]) <= 1e-4


def _tiny_as_original(folder):
    import json

    from modelscope_t2v.formats.unet_layout import unet_config_from_original

    cfg = json.loads((folder / "configuration.json").read_text())["model"]["model_cfg"]
    return unet_config_from_original(cfg, safe_torch_load(folder / "text2video_pytorch_model.pth"))


def test_dtype_cast_and_variant_names(original, tmp_path):
    folder, _ = original
    convert_checkpoint(folder, tmp_path / "d16", "diffusers", dtype="fp16", variant="fp16", progress=False)
    from safetensors.torch import load_file

    state = load_file(tmp_path / "d16" / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert {v.dtype for v in state.values()} == {torch.float16}


def test_cli_refuses_to_clobber_and_bad_arguments(original, tmp_path, capsys):
    folder, _ = original
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    assert convert_main([str(folder), str(dst), "--to", "diffusers", "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err and (dst / "keep.txt").read_text() == "precious"
    with pytest.raises(SystemExit):
        convert_main([str(folder), str(tmp_path / "x"), "--to", "onnx"])
    assert convert_main([str(tmp_path / "missing-folder"), str(tmp_path / "y"), "--to", "diffusers"]) == 2
    assert not (tmp_path / "y").exists()


def test_failed_conversion_leaves_no_partial_output(original, tmp_path):
    import shutil

    folder, _ = original
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    state = torch.load(broken / "open_clip_pytorch_model.bin", weights_only=True)
    state["transformer.resblocks.0.stray.weight"] = torch.zeros(1)
    torch.save(state, broken / "open_clip_pytorch_model.bin")
    with pytest.raises(ConversionError, match="stray"):
        convert_checkpoint(broken, tmp_path / "out", "diffusers", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# --- the key-table core ----------------------------------------------------------------------------


def test_apply_table_is_strict_and_invertible():
    src = {"a.weight": torch.randn(4, 3, 1), "qkv": torch.randn(6, 2), "x": torch.randn(2)}
    table = [Rename("a.weight", "A.w"), Split("qkv", ("q", "k", "v")), Rename("x", "X")]
    shapes = {"A.w": (4, 3), "q": (2, 2), "k": (2, 2), "v": (2, 2), "X": (2,)}
    out = apply_table(src, table, shapes)
    assert out["A.w"].shape == (4, 3) and torch.equal(out["k"], src["qkv"][2:4])
    back = apply_table(out, invert(table), {k: v.shape for k, v in src.items()})
    assert all(torch.equal(back[k], src[k]) for k in src)
    assert isinstance(invert(table)[1], Fuse)
    with pytest.raises(ConversionError, match="unexpected.*'extra'"):
        apply_table({**src, "extra": torch.zeros(1)}, table, shapes)
    with pytest.raises(ConversionError, match="missing tensor 'x'"):
        apply_table({k: v for k, v in src.items() if k != "x"}, table, shapes)
    with pytest.raises(ConversionError, match="'X' needs"):
        apply_table({**src, "x": torch.randn(3)}, table, shapes)
    with pytest.raises(ConversionError, match="missing tensor.*'Y'"):
        apply_table(src, table, {**shapes, "Y": (1,)})
    assert apply_table({**src, "extra": torch.zeros(1)}, table, shapes, ignore={"extra"}).keys() == out.keys()


def test_tiny_original_fixture_uses_the_original_constraints():
    assert TINY_ORIGINAL_UNET.cross_attention_dim == 1024 and TINY_ORIGINAL_UNET.norm_groups == 32


def test_overwrite_replaces_only_a_model_folder_it_could_have_written(original, tmp_path, capsys):
    """--overwrite never deletes the source, a folder holding it, or a folder with files of its own."""
    import shutil

    folder, _ = original
    src = tmp_path / "models" / "ms"
    shutil.copytree(folder, src)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for dst, message in [(src, "is the source folder"), (tmp_path / "models", "contains the source"),
                         (tmp_path, "contains the source")]:
        assert convert_main([str(src), str(dst), "--to", "diffusers", "--overwrite", "--quiet"]) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    # a previous conversion is replaced; one with a file of the user's beside it is not
    out = tmp_path / "out"
    assert convert_main([str(src), str(out), "--to", "diffusers", "--quiet"]) == 0
    assert convert_main([str(src), str(out), "--to", "diffusers", "--overwrite", "--quiet"]) == 0
    (out / "unet" / "notes.txt").write_text("mine")
    assert convert_main([str(src), str(out), "--to", "diffusers", "--overwrite", "--quiet"]) == 2
    assert "unet/notes.txt" in capsys.readouterr().err and (out / "unet" / "notes.txt").read_text() == "mine"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert convert_main([str(src), str(tmp_path / "run"), "--to", "modelscope", "--overwrite", "--quiet"]) == 2
    assert (tmp_path / "run" / "checkpoints").is_dir()
    ms = tmp_path / "ms-out"
    assert convert_main([str(out), str(ms), "--to", "modelscope", "--quiet"]) == 0
    assert convert_main([str(out), str(ms), "--to", "modelscope", "--overwrite", "--quiet"]) == 0


def test_a_model_the_original_layout_cannot_hold_fails_before_any_work(tmp_path, capsys):
    """The bundled shapes model's UNet widths (64, 96) are no multiples of the first: the original code's
    dim_mult cannot say them. The error comes from the configs alone, before a progress bar."""
    assert convert_main(["shapes", str(tmp_path / "ms"), "--to", "modelscope"]) == 2
    err = capsys.readouterr().err
    assert "cannot be written in the original ModelScope layout: unet:" in err and "it/s" not in err
    assert not (tmp_path / "ms").exists() and list(tmp_path.iterdir()) == []
