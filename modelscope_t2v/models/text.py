"""The text encoder: OpenCLIP ViT-H/14's text tower, read at its penultimate layer, and its tokenizer.

Why a transformers `CLIPTextModel`: it is exactly what the diffusers layout stores (23 of the 24
OpenCLIP layers, then `final_layer_norm`), so `text_encoder(ids)[0]` (the last hidden state) *is*
ModelScope's "penultimate" embedding. The original layout's `open_clip_pytorch_model.bin` (a whole
open_clip CLIP state dict, vision tower included) is converted into it by `formats.text_layout`.

Tokens: CLIP BPE, 77 positions, padded with "!" (id 0), because open_clip pads with 0 and the model
was trained that way. The vocabulary ships inside the open_clip package, so the tokenizer is built
offline from it without importing open_clip (which pulls in torchvision).

Contents: presets -> model -> tokenizer.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


# ----------------------------------------------------------------------------------------------------
# Presets: CLIPTextConfig keyword arguments.
# The token ids are those of the released text_encoder/config.json (the Stable Diffusion 2 one):
# transformers' pre-2023 defaults. They are not the tokenizer's ids (bos 49406, eos 49407, pad 0);
# eos_token_id == 2 makes transformers pool at argmax(ids), which is the eos for CLIP's vocabulary.
# They only affect `pooler_output`, which ModelScope never uses.

_RELEASED_TOKEN_IDS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)


def _tower(width: int, mlp: int, layers: int, heads: int, projection_dim: int) -> dict:
    """An OpenCLIP-style text tower over CLIP's 49,408-token vocabulary and 77 positions. hidden_act "gelu"
    is the exact erf GELU (nn.GELU in open_clip), not OpenAI CLIP's quick_gelu; projection_dim is unused
    by CLIPTextModel (the released config.json carries it)."""
    return dict(vocab_size=49408, hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                projection_dim=projection_dim, **_RELEASED_TOKEN_IDS)


TEXT_PRESETS: dict[str, dict] = {
    # For tests: the real vocabulary (so the real tokenizer works), 32 wide to match the tiny UNet's
    # cross_attention_dim. One head: the head-count rule of formats.text_layout (heads = width // 64, at
    # least 1) must give back the preset's head count from an open_clip file, which carries no heads.
    "tiny": _tower(width=32, mlp=128, layers=2, heads=1, projection_dim=32),
    # OpenCLIP ViT-H/14 text tower, 24 layers trained, 23 used (penultimate): 340.4M parameters.
    "ms-1.7b": _tower(width=1024, mlp=4096, layers=23, heads=16, projection_dim=512),
}

# The fields that define a text tower, in the order the released config.json lists them.
TEXT_CONFIG_FIELDS = (
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "hidden_act",
    "hidden_size",
    "initializer_factor",
    "initializer_range",
    "intermediate_size",
    "layer_norm_eps",
    "max_position_embeddings",
    "num_attention_heads",
    "num_hidden_layers",
    "pad_token_id",
    "projection_dim",
    "vocab_size",
)


def text_config(config: CLIPTextConfig | dict | str) -> CLIPTextConfig:
    """A CLIPTextConfig from itself, a preset name, or a config.json mapping (unknown fields refused)."""
    if isinstance(config, CLIPTextConfig):
        return config
    if isinstance(config, str):
        if config not in TEXT_PRESETS:
            raise ValueError(f"config: unknown text preset {config!r}; choose one of {sorted(TEXT_PRESETS)}")
        return CLIPTextConfig(**TEXT_PRESETS[config])
    if isinstance(config, Mapping):
        # A loaded config.json (or `config.to_dict()`) also carries keys that describe the file or are
        # generic to every transformers config; only the tower's own fields are taken.
        unknown = sorted(set(config) - set(TEXT_CONFIG_FIELDS) - _CONFIG_BOOKKEEPING - _generic_config_keys())
        if unknown:
            raise ValueError(f"config: unknown CLIPTextConfig field(s) {unknown}")
        return CLIPTextConfig(**{k: v for k, v in config.items() if k in TEXT_CONFIG_FIELDS})
    raise TypeError(f"config: expected a CLIPTextConfig, a dict or a preset name, got {type(config).__name__}")


# Keys of a text_encoder/config.json that describe the file, not the model.
_CONFIG_BOOKKEEPING = {
    "_name_or_path",
    "_commit_hash",
    "architectures",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "dropout",  # an old, unused CLIPTextConfig field that the released config.json still lists
}


@functools.lru_cache(maxsize=1)
def _generic_config_keys() -> frozenset[str]:
    """Keys every transformers config has (return_dict, id2label, ...), whatever the version."""
    from transformers import PretrainedConfig

    return frozenset(PretrainedConfig().to_dict())


def build_text_encoder(config: CLIPTextConfig | dict | str) -> CLIPTextModel:
    """A randomly initialised `CLIPTextModel` (build it under `torch.device("meta")` to size it for free).

    Embeddings are `model(input_ids)[0]`: (b, 77, width), the penultimate OpenCLIP layer after ln_final.
    """
    return CLIPTextModel(text_config(config)).eval()


# ----------------------------------------------------------------------------------------------------
# Tokenizer: CLIP BPE built offline from open_clip's vocabulary file.

BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "!"
CONTEXT_LENGTH = 77
_VOCAB_SIZE = 49408  # 256 bytes + 256 bytes+'</w>' + 48894 merges + 2 special tokens
_N_MERGES = _VOCAB_SIZE - 2 * 256 - 2


def _byte_alphabet() -> list[str]:
    """CLIP's byte-level alphabet: each of the 256 bytes as one printable unicode character.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are mapped, in
    byte order, to the code points 256, 257, ... The list is ordered as CLIP's vocabulary lists it.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def _open_clip_bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("build_tokenizer(path=None) needs the open_clip_torch package (its BPE file)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    raise FileNotFoundError("open_clip is installed but bpe_simple_vocab_16e6.txt.gz is missing from it")


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], tuple[str, ...]]:
    """(vocab, merges) of CLIP's tokenizer: alphabet, alphabet+'</w>', one token per merge, specials."""
    with gzip.open(_open_clip_bpe_file()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = tuple(lines[1 : 1 + _N_MERGES])  # line 0 is a version header
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != _VOCAB_SIZE:
        raise ValueError(f"open_clip's BPE file gave {len(vocab)} tokens, expected {_VOCAB_SIZE}")
    return vocab, merges


def _write_tokenizer_files(path: Path, vocab: Mapping[str, int], merges: Sequence[str], specials: dict) -> None:
    """The diffusers tokenizer/ folder: vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(dict(vocab), ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special_map = {k: specials[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    tokenizer_config = {
        "add_prefix_space": False,
        **special_map,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": specials["model_max_length"],
        "tokenizer_class": "CLIPTokenizer",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")


def build_tokenizer(path: str | None = None) -> CLIPTokenizer:
    """CLIP's tokenizer, padded with "!" (id 0) to 77 tokens.

    path: a diffusers `tokenizer/` folder (vocab.json, merges.txt, ...); None builds it offline from the
        BPE vocabulary inside the open_clip package (same ids as `open_clip.tokenize`).
    """
    if path is None:
        vocab, merges = _clip_bpe()
        specials = dict(bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=EOS, model_max_length=CONTEXT_LENGTH)
        with tempfile.TemporaryDirectory(prefix="clip-tokenizer-") as tmp:
            _write_tokenizer_files(Path(tmp), vocab, merges, specials)
            return build_tokenizer(tmp)  # read while the folder exists; tokenizers keep no file handles
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"path: {path!r} is not a tokenizer folder")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.pad_token_id != 0:
        raise ValueError(
            f"path: the tokenizer in {path!r} pads with {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}); "
            "the OpenCLIP text tower was trained with padding id 0 ('!')"
        )
    if tokenizer.model_max_length != CONTEXT_LENGTH:
        raise ValueError(f"path: model_max_length is {tokenizer.model_max_length} in {path!r}, expected 77")
    return tokenizer


def _tokenizer_bpe(tokenizer) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of a transformers CLIP tokenizer, fast (tokenizers backend) or slow (4.x)."""
    if hasattr(tokenizer, "backend_tokenizer"):
        model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        return dict(model["vocab"]), merges
    ranked = sorted(tokenizer.bpe_ranks.items(), key=lambda kv: kv[1])  # transformers 4.x slow tokenizer
    return dict(tokenizer.encoder), [" ".join(pair) for pair, _ in ranked]


def save_tokenizer(tokenizer: CLIPTokenizer, path: str) -> None:
    """Writes a diffusers-layout `tokenizer/` folder that `build_tokenizer(path)` (and diffusers) reads."""
    vocab, merges = _tokenizer_bpe(tokenizer)
    specials = dict(
        bos_token=str(tokenizer.bos_token),
        eos_token=str(tokenizer.eos_token),
        pad_token=str(tokenizer.pad_token),
        unk_token=str(tokenizer.unk_token),
        model_max_length=int(tokenizer.model_max_length),
    )
    _write_tokenizer_files(Path(path), vocab, merges, specials)


def clean_prompt(text: str) -> str:
    """open_clip's text cleaning (its tokenizer's default, clean='lower' less the lowercasing, which the
    BPE tokenizer does): ftfy's fixes (mojibake, curly quotes, full-width forms, ...), HTML entities
    unescaped twice, whitespace runs collapsed."""
    try:
        import ftfy  # a dependency of open_clip_torch
    except ImportError as e:  # pragma: no cover - open_clip_torch always brings it
        raise ImportError("tokenize(match='open_clip') needs ftfy (installed with open_clip_torch)") from e
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split())


TOKENIZE_MATCH = ("open_clip", "diffusers")


def tokenize(tokenizer: CLIPTokenizer, prompts: Sequence[str] | str, *, match: str = "open_clip") -> torch.LongTensor:
    """Token ids (b, 77): <|startoftext|>, the BPE tokens, <|endoftext|>, then "!" (id 0) padding.

    A prompt longer than 75 tokens keeps its first 75 and still ends with <|endoftext|>, as both
    open_clip and transformers truncate.

    match="open_clip" (default) gives the ids `open_clip.tokenize` gives, which the model was trained
        with and the original ModelScope pipeline feeds: open_clip's text cleaning (`clean_prompt`), and
        special-token strings in the prompt are BPE-encoded like any text. The latter matters for "!":
        transformers treats the pad token "!" as special, so diffusers' call turns every "!" of a prompt
        into a pad id 0 where open_clip has "!</w>" (256) or "!!!" (995).
    match="diffusers" calls the tokenizer exactly as diffusers' pipeline does (raw text, special tokens
        split out), for parity with it.
    One known difference remains with match="open_clip": open_clip 3.x maps a literal "<end_of_text>" or
    "<start_of_text>" in a prompt to its special token; here it is ordinary text.
    """
    if match not in TOKENIZE_MATCH:
        raise ValueError(f"match: expected one of {TOKENIZE_MATCH}, got {match!r}")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts: expected a string or a list of strings, got {prompts!r:.80}")
    open_clip_like = match == "open_clip"
    texts = [clean_prompt(p) for p in prompts] if open_clip_like else list(prompts)
    extra = {"split_special_tokens": True} if open_clip_like else {}
    batch = tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
        **extra,
    )
    return batch.input_ids


