"""`herd data ...`: run the pipeline, pack clean text, inspect shards, build the offline corpus,
train and apply classifiers.

    herd data run --input DIR [DIR ...] --output OUT [--tokenizer tokenizer.model] [--tasks 4 ...]
    herd data pack --input clean.jsonl --output OUT --tokenizer tokenizer.model
    herd data inspect OUT [--split train --seq-len 64 --window 0]
    herd data corpus OUT [--max-mb 20]
    herd data train-classifier ... / herd data score ... / herd data fit-kl ...   (herd.data.classifier_cli)
    herd data report PIPELINE_DIR REPORT_DIR   (herd.data.report)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from herd.flags import HelpFormatter, add_dataclass_args, dataclass_from_args
from herd.errors import HerdError


def add_data_args(parser: argparse.ArgumentParser) -> None:
    from herd.data.classifier_cli import add_score_args, add_train_classifier_args
    from herd.data.mix import DEFAULT_WEIGHTS
    from herd.data.pipeline import DataConfig

    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    fmt = HelpFormatter

    p = sub.add_parser("run", help="filter, dedup, mix and pack raw text (resumable)", formatter_class=fmt,
                       description="Run the pipeline: read -> language id -> heuristic filters -> [quality] -> URL, "
                                   "MinHash and line dedup -> [tokenize -> mix -> pack]. Re-running resumes.")
    p.add_argument("--input", nargs="+", required=True, help="files or folders (jsonl[.gz|.zst], parquet, text/source files)")
    p.add_argument("--output", required=True, help="output folder (shards, report, work/)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model; without it the run stops after dedup (clean jsonl)")
    add_dataclass_args(p, DataConfig, group="pipeline options")

    p = sub.add_parser("pack", help="tokenize already-clean documents into shards", formatter_class=fmt)
    p.add_argument("--input", nargs="+", required=True, help="files or folders of clean documents")
    p.add_argument("--output", required=True, help="output folder for manifest.json, train/ and val/")
    p.add_argument("--tokenizer", required=True, help="tokenizer.model (tiktoken format)")
    p.add_argument("--format", default="auto", help="auto, jsonl, parquet or text")
    p.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents held out (by id hash)")
    p.add_argument("--mix", default="none", help=f"domain weights, e.g. {DEFAULT_WEIGHTS}; none keeps the natural mix")
    p.add_argument("--max-repeat", type=float, default=4.0, help="most passes over a domain when upsampling")
    p.add_argument("--seed", type=int, default=0, help="seed of the mix and the validation split")
    p.add_argument("--shard-tokens", type=int, default=67_108_864, help="tokens per shard file")
    p.add_argument("--domain-rules", default="", help="source-substring=domain rules, e.g. github=code")

    p = sub.add_parser("inspect", help="print a shard directory's manifest and decode a window", formatter_class=fmt)
    p.add_argument("dir", help="folder with manifest.json")
    p.add_argument("--split", default="train")
    p.add_argument("--seq-len", type=int, default=64, help="training window length")
    p.add_argument("--window", type=int, default=0, help="which window to decode (-1: none)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to decode with (default: the manifest's path)")

    p = sub.add_parser("corpus", help="build an offline corpus from text on this machine", formatter_class=fmt)
    p.add_argument("output", help="folder for the jsonl files")
    p.add_argument("--max-mb", type=float, default=20.0, help="about this many MB of text in total")

    add_train_classifier_args(sub.add_parser("train-classifier", help="train a fastText quality/domain classifier",
                                             formatter_class=fmt))
    add_score_args(sub.add_parser("score", help="score documents with a trained classifier", formatter_class=fmt))
    from herd.data.classifier_cli import add_fit_kl_args
    from herd.data.report import add_report_args

    add_fit_kl_args(sub.add_parser("fit-kl", help="fit the corpus token distribution for the KL filter",
                                   formatter_class=fmt))
    add_report_args(sub.add_parser("report", help="write the per-stage report of a pipeline folder",
                                   formatter_class=fmt))


def _run(args: argparse.Namespace) -> int:
    from herd.data.pipeline import DataConfig, run_pipeline

    cfg = dataclass_from_args(DataConfig, args)
    result = run_pipeline(args.input, args.output, args.tokenizer, cfg)
    if result.report is None:
        print(f"submitted to the {cfg.executor} executor; logs under {Path(args.output) / 'work'}")
        return 0
    print(f"clean documents: {result.clean_dir / 'docs'}")
    if result.manifest:
        print(f"shards: {result.manifest}")
    print(f"report: {result.report}   ({result.seconds:.1f} s)")
    return 0


def _pack(args: argparse.Namespace) -> int:
    from herd.data.mix import assign_domain, parse_rules, parse_weights
    from herd.data.pack import pack_documents
    from herd.data.readers import iter_documents

    for p in args.input:  # before anything is written: a missing input leaves no output behind
        if not Path(p).exists():
            raise HerdError(f"input {p} does not exist; pass existing files or folders of clean documents.")
    weights = None if args.mix.strip().lower() in ("", "none") else parse_weights(args.mix)
    rules = parse_rules(args.domain_rules)

    def docs():
        for doc in iter_documents(args.input, args.format):
            doc.metadata["domain"] = assign_domain(doc.id, doc.metadata, rules)
            yield doc

    path = pack_documents(docs(), args.output, args.tokenizer, args.val_fraction, weights, args.seed,
                          args.max_repeat, args.shard_tokens)
    print(f"shards: {path}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from herd.data.pack import load_tokenizer
    from herd.data.shards import ShardDataset, check_tokenizer, find_tokenizer, read_manifest

    manifest = read_manifest(args.dir)
    tok = manifest["tokenizer"]
    print(f"{args.dir}: {manifest['format']}, tokenizer {tok['path']} (sha256 {tok['sha256'][:12]}..., "
          f"{tok['n_words']} tokens), seed {manifest['seed']}, created {manifest['created']}")
    for split, rec in manifest["splits"].items():
        domains = ", ".join(f"{d} {n / max(rec['tokens'], 1):.1%}" for d, n in rec["domains"].items())
        print(f"  {split}: {rec['tokens']:,} tokens, {rec['documents']:,} documents, {len(rec['shards'])} shard(s); {domains}")
    if manifest.get("mix", {}).get("domains"):
        print("  mix: " + json.dumps({d: v["share"] for d, v in manifest["mix"]["domains"].items()}))
    ds = ShardDataset(args.dir, args.split)
    n = ds.num_windows(args.seq_len)
    print(f"  {args.split}: {n:,} windows of {args.seq_len} tokens")
    if args.window >= 0 and n:
        path = find_tokenizer(args.dir, manifest, args.tokenizer)
        if path is None:
            raise HerdError(f"the shards in {args.dir} record no tokenizer; pass --tokenizer to decode a window.")
        tokenizer = load_tokenizer(path)
        check_tokenizer(manifest, tokenizer)
        x, _, docs = ds.get(args.window, args.seq_len)
        print(f"window {args.window} (document ids {docs.min()}..{docs.max()}):")
        print(repr(tokenizer.decode(x.tolist())))
    return 0


def _corpus(args: argparse.Namespace) -> int:
    from herd.data.corpus import build_local_corpus

    files = build_local_corpus(args.output, args.max_mb)
    print(f"{len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB in {args.output}")
    return 0


def run_data(args: argparse.Namespace) -> int | None:
    if args.data_command == "train-classifier":
        from herd.data.classifier_cli import run_train_classifier

        return run_train_classifier(args)
    if args.data_command == "score":
        from herd.data.classifier_cli import run_score

        return run_score(args)
    if args.data_command == "fit-kl":
        from herd.data.classifier_cli import run_fit_kl

        return run_fit_kl(args)
    if args.data_command == "report":
        from herd.data.report import run_report

        return run_report(args)
    handlers = {"run": _run, "pack": _pack, "inspect": _inspect, "corpus": _corpus}
    if args.data_command not in handlers:
        raise HerdError(f"unknown `herd data` subcommand {args.data_command!r}; see `herd data --help`.")
    return handlers[args.data_command](args)
