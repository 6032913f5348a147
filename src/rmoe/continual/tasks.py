"""Tasks for continual learning: loading prompt/answer and classification sets, and a built-in
demonstration sequence derived from data every Python installation has.

A :class:`Task` is a name plus training and evaluation :class:`~rmoe.training.sft.Example` lists.
:func:`load_task` reads a task spec::

    [NAME=]SOURCE[#key=value,key=value...]

    SOURCE
      builtin:NAME          one of BUILTIN_TASKS (naming, literal, statement, topic)
      PATH.jsonl / .json    the training rows; evaluation rows from PATH with "train" replaced
                            by "test" (then "eval", "validation", "dev") if such a file exists,
                            else a held-out share (``holdout``) of the rows
      DIR                   DIR/train.{jsonl,json} and DIR/{test,eval,validation,dev}.{jsonl,json}
      hf:NAME[:CONFIG]      a Hugging Face dataset (``datasets.load_dataset``, or a directory
                            written by ``save_to_disk``): splits "train" and "test" (else
                            "validation"), else a held-out share of "train"

    options (after #)
      prompt=FIELD, answer=FIELD     prompt/answer rows (default fields "prompt", "answer")
      text=FIELD, label=FIELD        classification rows: the prompt is built from the task name
                                     and the text, the answer is the label's name
      train=N, eval=N                keep at most N rows (class-balanced for classification)
      holdout=F                      share of the training rows held out when there is no
                                     evaluation file (default 0.1)
      max_chars=N                    cut classification texts to N characters (default 200)

A row is a prompt/answer row when it has the prompt field, else a classification row when it has
the text field (``text``, or ``sentence``/``content`` when ``text`` is absent) and the label field.
Integer labels are named by the dataset's ``ClassLabel`` names (``hf:``) or by a ``labels.json``
list next to the files (the O-LoRA / MIGU ``CL_Benchmark`` layout), else used as numbers.

Classification rows become ``Example(prompt=f"{task}: {text}\\n{task} label:", answer=label)``,
i.e. the label is generated with the task name in the prompt, as in the MIGU/O-LoRA protocol.

Built-in tasks (:data:`BUILTIN_TASKS`), deterministic, from the standard library sources and
``pydoc``:

- ``naming``: a Python identifier -> its naming style (``snake``, ``lower``, ``camel``,
  ``constant``, ``private``, ``dunder``).
- ``literal``: a literal from the sources -> its type (``int``, ``hex``, ``float``,
  ``complex``, ``str``, ``raw``, ``bytes``, ``fstring``).
- ``statement``: a source line -> its kind (``def``, ``class``, ``import``, ``return``, ``if``,
  ``loop``, ``try``, ``raise``, ``comment``, ``decorator``).
- ``topic``: a ``pydoc`` help keyword or topic name (``help("and")``, ``help("NUMBERS")``) -> the
  ``pydoc_data.topics`` entry it shows (``booleans``, ``numbers``...). A memorisation task: its
  evaluation set is its training set.

The first three generalise (evaluation inputs never occur in training).
"""

from __future__ import annotations

import hashlib
import json
import keyword
import random
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmoe.data.examples import Example, read_rows

__all__ = [
    "BUILTIN_TASKS",
    "DEMO_SEQUENCE",
    "Task",
    "builtin_task",
    "classification_example",
    "load_task",
    "parse_task_spec",
    "write_task",
]


@dataclass
class Task:
    """A named task: training and evaluation examples.

    Attributes:
        name: short name used in prompts, tables and file names.
        train: training examples.
        eval: evaluation examples.
        source: the spec it came from.
        labels: the label names for classification tasks (else empty).
    """

    name: str
    train: list[Example]
    eval: list[Example]
    source: str = ""
    labels: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "train": len(self.train),
            "eval": len(self.eval),
            "labels": self.labels,
        }


def _bucket(key: str) -> int:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % 100


def classification_example(task: str, text: str, label: str, max_chars: int = 200) -> Example:
    """A classification item posed as answer generation, with the task name in the prompt."""
    text = " ".join(str(text).split())[:max_chars]
    return Example(f"{task}: {text}\n{task} label:", f" {label}")


# ----------------------------------------------------------------------------------------------
# Built-in tasks
# ----------------------------------------------------------------------------------------------
def _stdlib_sources(max_files: int = 120) -> list[str]:
    """Sources of a deterministic sample of standard-library modules (every 5th file)."""
    from rmoe.data import stdlib_files

    files = stdlib_files()
    picked = files[::5][:max_files]
    out = []
    for _, path in picked:
        try:
            out.append(path.read_text(encoding="utf-8", errors="replace"))
        except OSError:  # pragma: no cover - unreadable file
            continue
    return out


_STYLES: list[tuple[str, re.Pattern[str]]] = [
    ("dunder", re.compile(r"^__[a-z][a-z0-9_]*__$")),
    ("private", re.compile(r"^_[a-z][a-z0-9_]*$")),
    ("constant", re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)+$|^[A-Z]{3,}[0-9]*$")),
    ("camel", re.compile(r"^[A-Z][a-z0-9]+([A-Z][a-z0-9]+)+$")),
    ("snake", re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)+$")),
    ("lower", re.compile(r"^[a-z]{3,}[0-9]*$")),
]


def _naming_items(sources: Sequence[str]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for src in sources:
        for ident in re.findall(r"\b[A-Za-z_][A-Za-z0-9_]*\b", src):
            if ident in seen or keyword.iskeyword(ident) or len(ident) > 28:
                continue
            for label, pattern in _STYLES:
                if pattern.match(ident):
                    seen[ident] = label
                    break
    return sorted(seen.items())


_LITERAL_RE = re.compile(
    r"""(?P<str>\b[bBfFrRuU]{0,2}(?:'[^'\n\\]{1,30}'|"[^"\n\\]{1,30}"))"""
    r"|(?P<num>(?<![\w.])(?:0[xX][0-9a-fA-F_]+|\d[\d_]*\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+"
    r"|\d[\d_]*)j?(?![\w.]))"
)


def _literal_label(text: str) -> str | None:
    """The type of a literal token (``None`` for kinds left out)."""
    low = text.lower()
    if low[0] in "'\"" or low[0].isalpha():
        prefix = re.match(r"^[a-z]*", low).group(0)
        if "b" in prefix:
            return "bytes"
        if "f" in prefix:
            return "fstring"
        if "r" in prefix:
            return "raw"
        return "str"
    if low.endswith("j"):
        return "complex"
    if low.startswith("0x"):
        return "hex"
    if "." in low or "e" in low:
        return "float"
    return "int"


def _literal_items(sources: Sequence[str]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for src in sources:
        for line in src.splitlines():
            if line.lstrip().startswith("#"):
                continue
            for m in _LITERAL_RE.finditer(line):
                text = m.group(0)
                if text not in seen:
                    label = _literal_label(text)
                    if label is not None:
                        seen[text] = label
    return sorted(seen.items())


_STATEMENTS: list[tuple[str, tuple[str, ...]]] = [
    ("def", ("def ", "async def ")),
    ("class", ("class ",)),
    ("import", ("import ", "from ")),
    ("return", ("return ", "return\n")),
    ("if", ("if ", "elif ")),
    ("loop", ("for ", "while ", "async for ")),
    ("try", ("try:", "except", "finally:")),
    ("raise", ("raise ",)),
    ("comment", ("#",)),
    ("decorator", ("@",)),
]


def _statement_items(sources: Sequence[str]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for src in sources:
        for raw in src.splitlines():
            line = raw.strip()
            if len(line) < 4 or line in seen:
                continue
            for label, prefixes in _STATEMENTS:
                if line.startswith(prefixes) or (label == "return" and line == "return"):
                    seen[line[:60]] = label
                    break
    return sorted(seen.items())


def _topic_items() -> list[tuple[str, str]]:
    import pydoc
    from pydoc_data.topics import topics as texts

    helper = pydoc.Helper
    items: dict[str, str] = {}

    def resolve(ref: str, depth: int = 0) -> str | None:
        if depth > 4 or not ref:
            return None
        if ref in helper.keywords:
            value = helper.keywords[ref]
            return value[0] if isinstance(value, tuple) else resolve(value, depth + 1)
        if ref in helper.topics:
            value = helper.topics[ref]
            return value[0] if isinstance(value, tuple) else resolve(value, depth + 1)
        return None

    for name in sorted(set(helper.keywords) | set(helper.topics)):
        label = resolve(name)
        if label and label in texts:
            items[name] = label
    return sorted(items.items())


def _balanced(items: Sequence[tuple[str, str]], n: int, seed: int) -> list[tuple[str, str]]:
    """At most ``n`` items, as even over labels as the data allows, in a seeded order."""
    by_label: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for item in items:
        by_label[item[1]].append(item)
    rng = random.Random(seed)
    for label in sorted(by_label):
        rng.shuffle(by_label[label])
    out: list[tuple[str, str]] = []
    labels = sorted(by_label)
    while len(out) < n and any(by_label[lb] for lb in labels):
        for lb in labels:
            if by_label[lb] and len(out) < n:
                out.append(by_label[lb].pop())
    rng.shuffle(out)
    return out


_BUILTIN_MAKERS: dict[str, Callable[[Sequence[str]], list[tuple[str, str]]]] = {
    "naming": _naming_items,
    "literal": _literal_items,
    "statement": _statement_items,
}

BUILTIN_TASKS: tuple[str, ...] = ("naming", "literal", "statement", "topic")
"""Names accepted by :func:`builtin_task` (``builtin:NAME`` in a task spec)."""

DEMO_SEQUENCE: tuple[str, ...] = ("naming", "literal", "statement", "topic")
"""The default task order of ``rmoe continual run``."""

_SOURCES_CACHE: list[str] = []


def builtin_task(
    name: str, n_train: int = 1000, n_eval: int = 200, seed: int = 0, max_files: int = 120
) -> Task:
    """One built-in task (see the module docstring), class-balanced.

    Args:
        name: one of :data:`BUILTIN_TASKS`.
        n_train: at most this many training examples.
        n_eval: at most this many evaluation examples (``topic``: its training items).
        seed: order and sub-sampling.
        max_files: standard-library files scanned (every 5th file, sorted by path).
    """
    if name not in BUILTIN_TASKS:
        import difflib

        near = difflib.get_close_matches(name, BUILTIN_TASKS, n=1)
        raise ValueError(
            f"unknown built-in task {name!r}; choose from {', '.join(BUILTIN_TASKS)}"
            + (f" (nearest: {near[0]!r})" if near else "")
        )
    if name == "topic":
        items = _topic_items()
        rng = random.Random(seed)
        train_items = list(items)
        rng.shuffle(train_items)
        train_items = train_items[:n_train]
        train = [classification_example(name, x, y) for x, y in train_items]
        return Task(
            name, train, list(train[:n_eval]), f"builtin:{name}", sorted({y for _, y in items})
        )
    if not _SOURCES_CACHE:
        _SOURCES_CACHE.extend(_stdlib_sources(max_files))
    items = _BUILTIN_MAKERS[name](_SOURCES_CACHE)
    train_pool = [it for it in items if _bucket(f"{name}:{it[0]}") < 80]
    eval_pool = [it for it in items if _bucket(f"{name}:{it[0]}") >= 80]
    train = [classification_example(name, x, y) for x, y in _balanced(train_pool, n_train, seed)]
    evals = [classification_example(name, x, y) for x, y in _balanced(eval_pool, n_eval, seed)]
    return Task(name, train, evals, f"builtin:{name}", sorted({y for _, y in items}))


# ----------------------------------------------------------------------------------------------
# Loading task specs
# ----------------------------------------------------------------------------------------------
_EVAL_NAMES = ("test", "eval", "validation", "valid", "dev")


def parse_task_spec(spec: str) -> tuple[str | None, str, dict[str, str]]:
    """``[NAME=]SOURCE[#k=v,...]`` -> ``(name or None, source, options)``."""
    body, _, opts = spec.partition("#")
    name: str | None = None
    named = re.match(r"^([\w.-]+)=(.*)$", body)
    if named:
        name, body = named.group(1), named.group(2)
    options: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in opts.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"task option {part!r} in {spec!r} must be key=value")
        options[key.strip()] = value.strip()
    known = {"prompt", "answer", "text", "label", "train", "eval", "holdout", "max_chars"}
    unknown = set(options) - known
    if unknown:
        raise ValueError(
            f"unknown task option(s) {sorted(unknown)} in {spec!r}; known: {sorted(known)}"
        )
    if not body:
        raise ValueError(f"task spec {spec!r} has no source")
    return name, body, options


def _label_names_file(directory: Path) -> list[str] | None:
    for cand in ("labels.json", "label_names.json"):
        p = directory / cand
        if p.is_file():
            names = json.loads(p.read_text())
            if isinstance(names, list):
                return [str(x) for x in names]
    return None


def _rows_to_examples(
    rows: Sequence[dict[str, Any]],
    task: str,
    options: dict[str, str],
    label_names: Sequence[str] | None,
    where: str,
) -> tuple[list[Example], list[str]]:
    prompt_f = options.get("prompt", "prompt")
    answer_f = options.get("answer", "answer")
    label_f = options.get("label", "label")
    max_chars = int(options.get("max_chars", 200))
    if not rows:
        return [], []
    first = rows[0]
    if prompt_f in first and "text" not in options:
        out = []
        for n, row in enumerate(rows, start=1):
            if prompt_f not in row or answer_f not in row:
                raise ValueError(
                    f"{where}: row {n} lacks {prompt_f!r} or {answer_f!r}; its fields are "
                    f"{sorted(row)}"
                )
            out.append(Example(str(row[prompt_f]), str(row[answer_f])))
        return out, []
    text_f = options.get("text")
    if text_f is None:
        text_f = next((f for f in ("text", "sentence", "content") if f in first), "text")
    if text_f not in first or label_f not in first:
        raise ValueError(
            f"{where}: rows need {prompt_f!r}/{answer_f!r} (prompt/answer) or {text_f!r}/"
            f"{label_f!r} (classification); the first row has {sorted(first)}; set the fields "
            f"with #prompt=..,answer=.. or #text=..,label=.."
        )
    out = []
    labels: set[str] = set()
    for row in rows:
        label = row[label_f]
        if isinstance(label, int) and label_names is not None and 0 <= label < len(label_names):
            label = label_names[label]
        label = str(label)
        labels.add(label)
        out.append(classification_example(task, row[text_f], label, max_chars))
    return out, sorted(labels)


def _limit(examples: list[Example], n: int | None, seed: int, balanced: bool) -> list[Example]:
    if n is None or len(examples) <= n:
        return examples
    if balanced:
        picked = _balanced([(ex.prompt, ex.answer) for ex in examples], n, seed)
        return [Example(p, a) for p, a in picked]
    rng = random.Random(seed)
    return rng.sample(examples, n)


def _hf_rows(name: str) -> tuple[list[dict], list[dict] | None, list[str] | None]:
    import datasets

    dname, _, config = name.partition(":")
    path = Path(dname).expanduser()
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
    else:
        loaded = datasets.load_dataset(dname, config or None)
    if isinstance(loaded, datasets.Dataset):
        loaded = {"train": loaded}
    if "train" not in loaded:
        raise ValueError(f"dataset hf:{name} has no 'train' split; it has {sorted(loaded)}")
    train = loaded["train"]
    label_names = None
    for feat in train.features.values():
        if hasattr(feat, "names"):
            label_names = list(feat.names)
            break
    evals = next((loaded[s] for s in ("test", "validation", "valid", "dev") if s in loaded), None)
    return (
        list(train),
        None if evals is None else list(evals),
        label_names,
    )


def load_task(
    spec: str, seed: int = 0, n_train: int | None = None, n_eval: int | None = None
) -> Task:
    """Load one task from a spec (module docstring); ``n_train``/``n_eval`` are defaults that
    the spec's ``train=``/``eval=`` options override."""
    name, source, options = parse_task_spec(spec)
    n_tr = int(options["train"]) if "train" in options else n_train
    n_ev = int(options["eval"]) if "eval" in options else n_eval
    if source.startswith("builtin:"):
        bname = source.partition(":")[2]
        task = builtin_task(bname, n_tr or 1000, n_ev or 200, seed)
        task.name = name or bname
        if name and name != bname:  # re-prompt with the chosen name
            task.train = [_rename(ex, bname, name) for ex in task.train]
            task.eval = [_rename(ex, bname, name) for ex in task.eval]
        return task
    holdout = float(options.get("holdout", 0.1))
    label_names: list[str] | None = None
    if source.startswith("hf:"):
        train_rows, eval_rows, label_names = _hf_rows(source[3:])
        default_name = source[3:].split(":")[0].rstrip("/").split("/")[-1]
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"task source {source!r} does not exist (expected a .jsonl/.json file, a "
                "directory with train.jsonl, builtin:NAME or hf:NAME)"
            )
        if path.is_dir():
            train_file = next(
                (
                    path / f"train{ext}"
                    for ext in (".jsonl", ".json")
                    if (path / f"train{ext}").is_file()
                ),
                None,
            )
            if train_file is None:
                raise FileNotFoundError(f"{path} has no train.jsonl or train.json")
            eval_file = next(
                (
                    path / f"{n}{ext}"
                    for n in _EVAL_NAMES
                    for ext in (".jsonl", ".json")
                    if (path / f"{n}{ext}").is_file()
                ),
                None,
            )
            default_name = path.name
            label_names = _label_names_file(path)
        else:
            train_file = path
            eval_file = None
            if "train" in path.name:
                for n in _EVAL_NAMES:
                    cand = path.with_name(path.name.replace("train", n))
                    if cand.is_file():
                        eval_file = cand
                        break
            default_name = (
                path.stem.replace(".train", "").replace("_train", "").replace("train", "")
                or path.stem
            )
            label_names = _label_names_file(path.parent)
        train_rows = read_rows(train_file)
        eval_rows = read_rows(eval_file) if eval_file is not None else None
    task_name = name or re.sub(r"[^\w.-]+", "_", default_name).strip("_") or "task"
    if eval_rows is None:
        keep = [r for i, r in enumerate(train_rows) if _bucket(f"{task_name}:{i}") >= holdout * 100]
        held = [r for i, r in enumerate(train_rows) if _bucket(f"{task_name}:{i}") < holdout * 100]
        train_rows, eval_rows = keep, held
    train, labels = _rows_to_examples(train_rows, task_name, options, label_names, source)
    evals, eval_labels = _rows_to_examples(eval_rows, task_name, options, label_names, source)
    if not train or not evals:
        raise ValueError(
            f"task {task_name!r} from {source!r} has {len(train)} training and {len(evals)} "
            "evaluation examples; both must be non-empty"
        )
    balanced = bool(labels)
    return Task(
        task_name,
        _limit(train, n_tr, seed, balanced),
        _limit(evals, n_ev, seed + 1, balanced),
        spec,
        sorted(set(labels) | set(eval_labels)),
    )


def _rename(ex: Example, old: str, new: str) -> Example:
    prompt = ex.prompt
    if prompt.startswith(f"{old}: "):
        prompt = f"{new}: " + prompt[len(old) + 2 :]
    prompt = prompt.replace(f"\n{old} label:", f"\n{new} label:")
    return Example(prompt, ex.answer)


def write_task(task: Task, directory: str | Path) -> Path:
    """Write ``train.jsonl`` and ``test.jsonl`` (prompt/answer rows) for a task; returns the dir."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for fname, rows in (("train.jsonl", task.train), ("test.jsonl", task.eval)):
        with open(out / fname, "w", encoding="utf-8") as f:
            for ex in rows:
                f.write(json.dumps({"prompt": ex.prompt, "answer": ex.answer}) + "\n")
    return out
