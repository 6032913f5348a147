"""The data pipeline: corpora by name, tokenizers, a memory-mapped token cache, the sampler and
supervised prompt -> answer examples (:mod:`rmoe.data.examples`).

Typical use::

    from rmoe.data import get_corpus, build_tokenizer, get_split_tokens, WindowSampler, get_batch

    corpus = get_corpus("python-stdlib")
    tokenizer = build_tokenizer("bytes")          # or "bpe:8192", train_texts=corpus.documents("train")
    train = get_split_tokens(corpus, tokenizer, "train")       # TokenSplit, tokens: memmap [N]
    sampler = WindowSampler(train.n_tokens, seq_len=256, batch_size=32, seed=0)
    x, y = get_batch(train.tokens, next(sampler), seq_len=256)  # int64 [B, T] each
"""

from rmoe.data.cache import (
    CACHE_ENV_VAR,
    TokenSplit,
    cache_key,
    default_cache_dir,
    get_split_tokens,
)
from rmoe.data.corpora import (
    CORPUS_KINDS,
    DEFAULT_CORPUS,
    SPLITS,
    Corpus,
    Document,
    as_text,
    get_corpus,
    load_corpus,
    split_of,
    stdlib_files,
)
from rmoe.data.examples import (
    IGNORE_INDEX,
    Example,
    collate,
    encode_example,
    load_examples,
    read_rows,
)
from rmoe.data.sampler import WindowSampler, eval_windows, get_batch
from rmoe.data.tokenizer import (
    DEFAULT_TOKENIZER,
    EOS_TOKEN,
    PAD_TOKEN,
    Tokenizer,
    build_tokenizer,
)

__all__ = [
    "CACHE_ENV_VAR",
    "CORPUS_KINDS",
    "DEFAULT_CORPUS",
    "DEFAULT_TOKENIZER",
    "EOS_TOKEN",
    "IGNORE_INDEX",
    "PAD_TOKEN",
    "SPLITS",
    "Corpus",
    "Document",
    "Example",
    "TokenSplit",
    "Tokenizer",
    "WindowSampler",
    "as_text",
    "build_tokenizer",
    "cache_key",
    "collate",
    "default_cache_dir",
    "encode_example",
    "eval_windows",
    "get_batch",
    "get_corpus",
    "get_split_tokens",
    "load_corpus",
    "load_examples",
    "read_rows",
    "split_of",
    "stdlib_files",
]
