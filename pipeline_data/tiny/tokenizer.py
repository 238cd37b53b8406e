"""Our own small CLIP BPE tokenizer for the tiny base model (vocab.json + merges.txt).

Same layout as OpenAI CLIP's files, so transformers' ``CLIPTokenizer`` and diffusers load it unchanged: the 256
byte-level symbols, the same symbols with ``</w>``, the merges in rank order, then ``<|startoftext|>`` and
``<|endoftext|>``. Merges are learnt (``tokenizers`` BPE trainer, deterministic) from a built-in list of ordinary
English prompt words, so those words are single tokens; anything else falls back to sub-words or bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77  # CLIP context length; a CLIPTokenizer from plain files would default to 1e30

# Ordinary prompt vocabulary (lower case). Captions of the tiny model use a handful of these; the rest keep
# user prompts tokenisable as whole words.
_WORDS = """
a an the of and or with without in on at to from by for as is are be this that it its his her their my your our
photo photograph picture image portrait selfie headshot close closeup up shot face faces person people human
man woman men women boy girl child kid baby adult old young elderly teenager guy lady gentleman sks ohwx
smiling smile smiles laughing laugh happy sad serious angry surprised neutral calm looking looks look camera
at front side profile left right view frontal three quarter centered center cropped crop aligned
black white grey gray colour color colorful red green blue yellow orange purple pink brown dark light bright
blond blonde brunette hair haired bald beard bearded moustache mustache glasses sunglasses hat cap
shirt suit tie jacket dress coat sweater uniform hoodie scarf earrings necklace makeup lipstick
background studio outdoor outdoors indoor indoors street city park beach forest mountain mountains snow sea
ocean sky sunset sunrise night day evening morning office room home house garden field river lake desert space
lighting lit soft hard natural dramatic cinematic studio film analog digital professional amateur candid
high quality detailed sharp blurry blurred blur focus bokeh depth resolution hd hdr realistic photorealistic
painting painted drawing sketch pencil charcoal watercolor oil acrylic ink cartoon anime comic illustration
art artwork style styled render rendered 3d digital concept pixel vintage retro modern classic old fashioned
renaissance baroque impressionist impressionism cubism pop surreal fantasy sci fi cyberpunk steampunk noir
van gogh monet picasso rembrandt warhol
by trending artstation masterpiece best worst low bad ugly deformed distorted extra missing fingers hands
wearing holding standing sitting walking running posing smiling
wedding party concert stage news press magazine cover poster passport id document
astronaut doctor chef soldier king queen knight wizard pirate superhero police firefighter scientist
photo of a person
very more most less small large big tall short long wide thin thick
one two three four five six seven eight nine ten
"""


def words() -> list[str]:
    """The built-in word list, deduplicated, in order."""
    seen: dict[str, None] = {}
    for w in _WORDS.split():
        seen.setdefault(w, None)
    return list(seen)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_vocab_and_merges(extra_words: list[str] | None = None) -> tuple[dict[str, int], list[str]]:
    """Learn merges for the word list; return (vocab, merges) in CLIP's file layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    corpus = words() + [w.lower() for w in (extra_words or [])]
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # never reached: training stops when every word is one token
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        continuing_subword_prefix="",
        special_tokens=[],
    )
    # repeat so every word's pairs are frequent enough; one word per line
    tok.train_from_iterator([w for w in corpus for _ in range(2)], trainer)
    merges_raw = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges_raw]
    base = list(bytes_to_unicode().values())
    vocab_list = base + [b + "</w>" for b in base]
    seen = set(vocab_list)
    for m in merges:
        merged = m.replace(" ", "")
        if merged not in seen:
            seen.add(merged)
            vocab_list.append(merged)
    vocab_list += [BOS, EOS]
    return {t: i for i, t in enumerate(vocab_list)}, merges


def write_tokenizer(out_dir: str | Path) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges()
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": MODEL_MAX_LENGTH,
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": EOS,
                "pad_token": EOS,
                "do_lower_case": True,
            },
            indent=2,
        ),
        "special_tokens_map.json": json.dumps(
            {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2
        ),
    }
    for name, text in files.items():
        tmp = out / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
    return out


def load_tokenizer(path: str | Path):
    """A transformers CLIPTokenizer from our files, with model_max_length 77."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    tok.model_max_length = MODEL_MAX_LENGTH
    return tok
