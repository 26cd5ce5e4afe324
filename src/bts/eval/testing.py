"""Hermetic helpers for tests and smoke runs of the suite: a tiny byte-level BPE fast tokenizer and synthetic
records with the data layer's shapes (docs/design.md §3; ``bts.data.load_split`` records). Nothing touches the network.
"""

from __future__ import annotations

import random


def tiny_tokenizer(texts, vocab_size: int = 512):
    """A ``PreTrainedTokenizerFast`` (byte-level BPE, pad=0, bos=1, eos=2, no special tokens added on encode)
    trained in-process on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


_WORDS = ["the", "a", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "it", "from", "at", "his", "an", "were", "are", "which", "this", "be", "or", "had", "also", "city", "river", "king", "war", "first", "new", "year", "people", "time", "world", "state", "music", "film", "team", "school", "part", "history", "known"]
_LANGS = {
    "nl": ("Opslaan", "Verwijderen", "Gebruiker", "Wachtwoord", "Zoeken"),
    "es": ("Guardar", "Eliminar", "Usuario", "Contraseña", "Buscar"),
    "pt": ("Salvar", "Excluir", "Usuário", "Senha", "Pesquisar"),
    "vi": ("Lưu", "Xóa", "Người dùng", "Mật khẩu", "Tìm kiếm"),
    "id": ("Simpan", "Hapus", "Pengguna", "Kata sandi", "Cari"),
    "hi": ("सहेजें", "हटाएं", "उपयोगकर्ता", "पासवर्ड", "खोजें"),
    "fr": ("Enregistrer", "Supprimer", "Utilisateur", "Mot de passe", "Rechercher"),
}
_EN = ("Save", "Delete", "User", "Password", "Search")


def synthetic_records(n: int = 40, seed: int = 0) -> dict[str, list[dict]]:
    """``{domain: records}`` for general, code, math and multilingual, shaped like ``bts.data.load_split``."""
    rng = random.Random(seed)
    general = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(20, 60))]
        general.append({"text": " ".join(words).capitalize() + ".", "domain": "general"})
    code = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        text = (
            f"def f{i}(x, y={a}):\n    if x > {b}:\n        return x + y\n    for k in range({a}):\n"
            f"        x = x * {b}\n    return x\n"
        )
        code.append({"text": text, "domain": "code", "path": f"mod{i}.py"})
    math = []
    for i in range(n):
        a, b = rng.randint(-20, 20), rng.randint(1, 20)
        q, ans = f"What is {a} + {b}?", str(a + b)
        math.append({"text": f"Question: {q}\nAnswer: {ans}", "question": q, "answer": ans,
                     "module": "arithmetic__add_or_sub", "domain": "math"})
    multi = []
    for i in range(n):
        lang = sorted(_LANGS)[i % len(_LANGS)]
        j = rng.randrange(len(_EN))
        en, xx = f"{_EN[j]} item {i}", f"{_LANGS[lang][j]} {i}"
        multi.append({"text": f"{en}\n{xx}", "en": en, "xx": xx, "lang": lang, "domain": "multilingual"})
    return {"general": general, "code": code, "math": math, "multilingual": multi}


def all_texts(records: dict[str, list[dict]]) -> list[str]:
    return [r["text"] for recs in records.values() for r in recs]
