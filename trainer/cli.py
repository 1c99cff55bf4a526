"""The `plait` command line: one sub-command per user task; each prints its result as a final JSON line."""

from __future__ import annotations

import argparse
import ast
import importlib
import pkgutil
import sys
from pathlib import Path

from plait.data.loader import TooManyFailures
from plait.trainer.config_loader import ConfigError
from plait.trainer.data_walk import add_parser as add_data_walk
from plait.trainer.train_command import EXIT_BAD_INPUT
from plait.trainer.train_command import add_parser as add_train


def _cmd_config_show(args: argparse.Namespace) -> None:
    from plait.trainer.config import load_config
    from plait.trainer.config_loader import render_yaml

    config = load_config(args.config, args.set)
    sys.stdout.write(render_yaml(config) + "\n")


def _cmd_curriculum_show(args: argparse.Namespace) -> None:
    from plait.trainer.config import load_config
    from plait.trainer.console import console, emit_result
    from plait.trainer.curriculum import Curriculum, curriculum_table, plot_curriculum

    config = load_config(args.config, args.set)
    curriculum = Curriculum.from_run(config)
    out = args.out or f"{Path(args.config).stem}-curriculum.png"
    console.print(curriculum_table(curriculum), highlight=False, soft_wrap=True)
    plot_curriculum(curriculum, out, steps=args.steps or None)
    emit_result({"phases": len(config.curriculum.phases), "plot": out})


def _cmd_embed(args: argparse.Namespace) -> None:
    from rich.table import Table

    from plait.trainer.console import console, emit_result
    from plait.trainer.export import load_any

    model = load_any(args.model)
    similarity = (model.encode_media(args.media) @ model.encode_text(args.text).T).tolist()
    table = Table("media \\ text", *args.text)
    for name, row in zip(args.media, similarity):
        table.add_row(name, *(f"{value:.3f}" for value in row))
    console.print(table)
    emit_result({"media": args.media, "text": args.text, "similarity": similarity})


def _cmd_demo_data(args: argparse.Namespace) -> None:
    from plait.data.demo import DemoSpec, write_demo
    from plait.data.indexer import index_dataset
    from plait.trainer.console import console, emit_result

    spec = DemoSpec(samples=args.samples, seed=args.seed, samples_per_shard=args.samples_per_shard)
    with console.status(f"writing {args.samples} demo samples to {args.out}"):
        paths, counts = write_demo(args.out, spec)
        index_dataset(args.out, out=args.out, workers=1)
    emit_result({"samples": sum(counts.values()), "shards": len(paths), "modalities": counts})


def _cmd_shards_build(args: argparse.Namespace) -> None:
    from plait.data.indexer import index_dataset
    from plait.data.shard_build import build_shards
    from plait.trainer.console import emit_result

    columns = {"path": args.path_column, "bytes": args.bytes_column, "caption": args.caption_column,
               "key": args.key_column, "group": args.group_column}
    built = build_shards(args.input, args.out, args.samples_per_shard, args.prefix, columns)
    indexed = index_dataset(str(Path(args.out) / f"{args.prefix}-*.tar"), out=args.out, workers=args.workers)
    emit_result({**built, "bad": indexed["bad"], "index": indexed["index"]})


def _cmd_shards_index(args: argparse.Namespace) -> None:
    from plait.data.indexer import index_dataset
    from plait.trainer.console import emit_result

    emit_result(index_dataset(args.shards, out=args.out, workers=args.workers))


def _bench_modules() -> dict[str, Path]:
    import plait.trainer.bench as bench

    return {m.name: Path(m.module_finder.path) / f"{m.name}.py" for m in pkgutil.iter_modules(bench.__path__)}


def _cmd_bench(args: argparse.Namespace) -> None:
    from plait.trainer.console import emit_result

    module = importlib.import_module(f"plait.trainer.bench.{args.bench}")
    emit_result(module.run(args))


def _add_bench(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    """Register every `trainer/bench/*.py`; only the one being run is imported (they pull in torch)."""
    bench = sub.add_parser("bench", help="benchmarks; each prints ratios against a baseline from the same run")
    names = bench.add_subparsers(dest="bench", required=True, metavar="NAME")
    wanted = argv[argv.index("bench") + 1] if "bench" in argv[:-1] else None
    for name, path in _bench_modules().items():
        summary = (ast.get_docstring(ast.parse(path.read_text())) or name).splitlines()[0]
        parser = names.add_parser(name, help=summary)
        if name == wanted:
            module = importlib.import_module(f"plait.trainer.bench.{name}")
            module.add_arguments(parser)
            parser.set_defaults(func=_cmd_bench)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="plait", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = sub.add_parser("config", help="inspect run configs").add_subparsers(dest="what", required=True)
    show = config.add_parser("show", help="print the resolved config with every field documented")
    show.add_argument("config")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    show.set_defaults(func=_cmd_config_show)

    curriculum = sub.add_parser("curriculum", help="inspect curricula").add_subparsers(dest="what", required=True)
    table = curriculum.add_parser("show", help="print the phase table and write a PNG plot of every schedule")
    table.add_argument("config", help="a run config or a configs/curricula/*.yaml fragment")
    table.add_argument("--out", default=None, help="PNG path (default: CONFIG_STEM-curriculum.png)")
    table.add_argument("--steps", type=int, default=0, help="steps to plot (default: past the last change)")
    table.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    table.set_defaults(func=_cmd_curriculum_show)

    embed = sub.add_parser("embed", help="media x text cosine similarities of a trained or exported model")
    embed.add_argument("model", help="an exported model directory, a run directory or a checkpoint folder")
    embed.add_argument("--media", nargs="+", required=True, metavar="FILE", help="image, audio or video files")
    embed.add_argument("--text", nargs="+", required=True, metavar="TEXT", help="captions")
    embed.set_defaults(func=_cmd_embed)

    demo = sub.add_parser("demo-data", help="write the built-in handwritten-digit demo dataset")
    demo.add_argument("--out", required=True)
    demo.add_argument("--samples", type=int, default=600)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--samples-per-shard", type=int, default=100)
    demo.set_defaults(func=_cmd_demo_data)

    shards = sub.add_parser("shards", help="build and index WebDataset shards").add_subparsers(
        dest="what", required=True)
    build = shards.add_parser("build", help="shards from a media folder or a JSONL/CSV/Parquet table")
    build.add_argument("--input", required=True, help="folder of media + same-stem .txt, or a table file")
    build.add_argument("--out", required=True)
    build.add_argument("--samples-per-shard", type=int, default=1000)
    build.add_argument("--prefix", default="shard")
    build.add_argument("--workers", type=int, default=0, help="indexing processes (0: one per core)")
    for column in ("path", "bytes", "caption", "key", "group"):
        build.add_argument(f"--{column}-column", default=None, help=f"table column holding the {column}")
    build.set_defaults(func=_cmd_shards_build)
    index = shards.add_parser("index", help="write Parquet manifests for existing shards")
    index.add_argument("shards", help="folder, glob, brace range or pipe: command")
    index.add_argument("--out", default=None, help="manifest folder (default: beside the shards)")
    index.add_argument("--workers", type=int, default=0, help="processes (0: one per core)")
    index.set_defaults(func=_cmd_shards_index)

    add_data_walk(sub)
    add_train(sub)
    _add_bench(sub, argv)
    return parser


def _name_parsers(parser: argparse.ArgumentParser) -> None:
    """Let every (sub-)command's parser put itself in the parsed args, so an unknown flag prints that command's
    usage rather than the top-level one."""
    parser.set_defaults(usage_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _name_parsers(child)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `plait` console script."""
    from plait.trainer.console import console, setup_logging

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    _name_parsers(parser)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args.usage_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    setup_logging(args.verbose)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, TooManyFailures) as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise SystemExit(EXIT_BAD_INPUT) from None
