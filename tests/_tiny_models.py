"""Offline test assets for the GLUE runner: a tiny random DeBERTa-v2 with a sentencepiece unigram tokenizer trained
on the fly, and tiny datasets written in the GLUE distribution's own file formats.

The tokenizer folder holds ``spm.model`` (what DeBERTa-v3 ships) and the ``tokenizer.json`` built from the same
pieces and scores, so ``DebertaV2Tokenizer.from_pretrained(folder)`` / ``AutoTokenizer`` load it without the
protobuf package (transformers 5 needs protobuf to convert ``spm.model`` itself; ``DebertaV2Tokenizer(vocab_file=
...)`` silently ignores the file).
"""

import io
import random
from pathlib import Path

POSITIVE = ("good", "great", "brilliant", "funny", "moving", "clever", "superb", "warm")
NEGATIVE = ("bad", "awful", "boring", "dull", "clumsy", "tedious", "weak", "flat")
NEUTRAL = ("the", "a", "movie", "film", "plot", "actor", "scene", "story", "is", "was", "very", "quite", "its",
           "ending", "cast", "script", "and", "but", "this", "director")


def sentence(rng: random.Random, label: int) -> str:
    """A short 'review' whose sentiment words match ``label`` (1 positive, 0 negative)."""
    words = [rng.choice(NEUTRAL) for _ in range(rng.randint(3, 9))]
    for _ in range(rng.randint(1, 2)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
    return " ".join(words)


def train_tokenizer(folder: Path, seed: int = 0):
    """Train a unigram sentencepiece model on synthetic reviews; save spm.model + tokenizer files in ``folder``."""
    import sentencepiece as spm
    from transformers import DebertaV2Tokenizer

    rng = random.Random(seed)
    corpus = [sentence(rng, rng.randint(0, 1)) for _ in range(400)]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=proto, vocab_size=96, hard_vocab_limit=False,
        model_type="unigram", pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="[PAD]", unk_piece="[UNK]",
        bos_piece="[CLS]", eos_piece="[SEP]", user_defined_symbols=["[MASK]"], minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spm.model").write_bytes(proto.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    DebertaV2Tokenizer(vocab=vocab).save_pretrained(folder)
    return DebertaV2Tokenizer.from_pretrained(folder)


def build_tiny_deberta(folder: Path) -> Path:
    """A 2-layer, 32-wide DeBERTa-v2 (v3-style relative attention) with random weights, saved with its tokenizer."""
    import torch
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    tokenizer = train_tokenizer(folder)
    config = DebertaV2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, relative_attention=True, position_buckets=16, max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
        type_vocab_size=0, pad_token_id=tokenizer.pad_token_id, num_labels=2)
    torch.manual_seed(0)
    DebertaV2ForSequenceClassification(config).save_pretrained(folder)
    return folder


def _pairs(rng: random.Random, n: int):
    """(first, second, label) pairs: label 1 when both halves share the sentiment."""
    out = []
    for _ in range(n):
        a, same = rng.randint(0, 1), rng.randint(0, 1)
        out.append((sentence(rng, a), sentence(rng, a if same else 1 - a), same))
    return out


def _write(path: Path, header: list | None, rows: list) -> None:
    lines = ([header] if header else []) + rows
    path.write_text("".join("\t".join(str(v) for v in line) + "\n" for line in lines), encoding="utf-8")


def write_glue_task(folder: Path, task: str, n_train: int = 48, n_dev: int = 24, seed: int = 0) -> Path:
    """Write ``task`` (sst2, cola, mrpc, stsb, mnli) in the GLUE distribution's file format into ``folder``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, n in [("train", n_train), *[(s, n_dev) for s in _dev_stems(task)]]:
        header, rows = _FORMATS[task](rng, n)
        _write(folder / f"{stem}.tsv", header, rows)
    return folder


def _dev_stems(task: str) -> list[str]:
    return ["dev_matched", "dev_mismatched"] if task == "mnli" else ["dev"]


def _sst2(rng, n):
    labels = [rng.randint(0, 1) for _ in range(n)]
    # an unbalanced quote: GLUE's files are read verbatim (QUOTE_NONE)
    return ["sentence", "label"], [[sentence(rng, y) + (' "' if i == 0 else ""), y] for i, y in enumerate(labels)]


def _cola(rng, n):  # CoLA ships without a header: source, label, original mark, sentence
    labels = [rng.randint(0, 1) for _ in range(n)]
    return None, [["gj04", y, "" if y else "*", sentence(rng, y)] for y in labels]


def _mrpc(rng, n):
    header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    return header, [[y, 100 + i, 200 + i, a, b] for i, (a, b, y) in enumerate(_pairs(rng, n))]


def _stsb(rng, n):
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
              "score"]
    rows = [[i, "main-news", "f", "2012", i, "none", "none", a, b, f"{y * 4 + rng.random():.3f}"]
            for i, (a, b, y) in enumerate(_pairs(rng, n))]
    return header, rows


def _mnli(rng, n):
    header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
    names = ("entailment", "neutral", "contradiction")
    rows = [[i, i, f"{i}e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", a, b, names[y], names[y]]
            for i, (a, b, y) in enumerate((a, b, rng.randint(0, 2)) for a, b, _ in _pairs(rng, n))]
    return header, rows


_FORMATS = {"sst2": _sst2, "cola": _cola, "mrpc": _mrpc, "stsb": _stsb, "mnli": _mnli}
