"""`herd data train-classifier`, `herd data score` and `herd data fit-kl`: the model-based filters' command line.

herd/data/cli.py registers these as subcommands; each pair is add_<name>_args(parser) and
run_<name>(args), like every herd command. fit-kl fits the corpus token distribution that
KLFilter compares documents against.

    herd data train-classifier --positive docs/ --negative web.jsonl --output hq.bin
    herd data train-classifier --input labeled.jsonl --label-key domain --output domain.bin
    herd data score --model hq.bin --input web.jsonl --output scored.jsonl --keep-top 0.3 --plot q.png
    herd data fit-kl --input corpus/ --output kl.json
"""

from __future__ import annotations

import argparse
import gzip
import json
from typing import Any, Iterator

from tqdm import tqdm

from herd.flags import add_dataclass_args, dataclass_from_args
from herd.data.filters.quality import ClassifierTrainConfig, FastTextClassifier, top_fraction_threshold, train_classifier
from herd.data.readers import iter_documents
from herd.errors import HerdError
from herd.fileio import atomic_open


def add_train_classifier_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="where to write the fastText model (.bin); metrics go to OUTPUT.json")
    parser.add_argument("--input", nargs="+", default=[], help="labeled jsonl files/folders: one object per line with text and label")
    parser.add_argument("--positive", nargs="+", default=[], help="files/folders of positive examples (any readable format)")
    parser.add_argument("--negative", nargs="+", default=[], help="files/folders of negative examples (any readable format)")
    parser.add_argument("--positive-label", default="hq", help="label given to --positive examples")
    parser.add_argument("--negative-label", default="lq", help="label given to --negative examples")
    parser.add_argument("--text-key", default="text", help="field holding the text in jsonl/parquet input")
    parser.add_argument("--label-key", default="label", help="field holding the label in --input records")
    parser.add_argument("--format", default="auto", choices=["auto", "jsonl", "parquet", "text"], help="input format")
    add_dataclass_args(parser, ClassifierTrainConfig, group="training")


def _labeled_examples(args: argparse.Namespace) -> list[tuple[str, str]]:
    examples: list[tuple[str, str]] = []
    missing = 0
    for doc in iter_documents(args.input, format=args.format, text_key=args.text_key) if args.input else []:
        label = doc.metadata.get(args.label_key)
        if label is None:
            missing += 1
            continue
        examples.append((doc.text, str(label)))
    if missing:
        print(f"skipped {missing} --input records without a '{args.label_key}' field")
    for paths, label in ((args.positive, args.positive_label), (args.negative, args.negative_label)):
        if paths:
            examples += [(d.text, label) for d in iter_documents(paths, format=args.format, text_key=args.text_key)]
    return examples


def run_train_classifier(args: argparse.Namespace) -> int:
    if not (args.input or args.positive or args.negative):
        raise HerdError("no training examples given; pass --input labeled.jsonl or --positive and --negative.")
    config = dataclass_from_args(ClassifierTrainConfig, args)
    examples = _labeled_examples(args)
    print(f"training on {len(examples)} labeled documents")
    metrics = train_classifier(examples, args.output, config, progress=True)
    acc = metrics["accuracy"]
    print(f"wrote {args.output} (labels: {', '.join(metrics['labels'])}; {metrics['n_train']} train, "
          f"{metrics['n_valid']} held out)")
    if acc is not None:
        print(f"held-out accuracy: {acc:.4f}")
        for lab, m in metrics["per_label"].items():
            print(f"  {lab}: precision {m['precision']:.4f} recall {m['recall']:.4f} (n={m['support']})")
    return 0


def add_score_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="fastText model written by `herd data train-classifier`")
    parser.add_argument("--input", nargs="+", required=True, help="files/folders of documents to score")
    parser.add_argument("--output", required=True, help="jsonl (or .jsonl.gz) of the kept, annotated documents")
    parser.add_argument("--mode", default="quality", choices=["quality", "domain"],
                        help="quality: metadata[KEY] = P(positive label); domain: metadata domain + domain_scores")
    parser.add_argument("--positive-label", default="hq", help="the label whose probability is the quality score")
    parser.add_argument("--key", default="quality_score", help="metadata key of the quality score")
    parser.add_argument("--threshold", type=float, default=None, help="keep documents scoring at least this")
    parser.add_argument("--keep-top", type=float, default=None, help="keep this fraction (0..1] of best-scoring documents")
    parser.add_argument("--plot", default=None, help="write a PNG histogram of the quality scores here")
    parser.add_argument("--text-key", default="text", help="field holding the text in jsonl/parquet input")
    parser.add_argument("--format", default="auto", choices=["auto", "jsonl", "parquet", "text"], help="input format")


def _write_jsonl(path: str, records: Iterator[dict[str, Any]]) -> int:
    """Write records atomically (temp file + rename); gzip when the name ends in .gz. Returns the count."""
    n = 0
    with atomic_open(path, "wt", opener=gzip.open if path.endswith(".gz") else open) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def run_score(args: argparse.Namespace) -> int:
    if args.threshold is not None and args.keep_top is not None:
        raise HerdError("--threshold and --keep-top both choose what to keep; pass only one of them.")
    if args.keep_top is not None and not 0 < args.keep_top <= 1:
        raise HerdError(f"--keep-top is a fraction in (0, 1], got {args.keep_top}.")
    clf = FastTextClassifier(args.model)
    if args.mode == "quality" and args.positive_label not in clf.labels:
        raise HerdError(f"the model has no label '{args.positive_label}' (it has {', '.join(clf.labels)}); "
                        "pass one of them as --positive-label.")

    def scored() -> Iterator[dict[str, Any]]:
        docs = iter_documents(args.input, format=args.format, text_key=args.text_key, problems=problems)
        for doc in tqdm(docs, desc="scoring", unit="doc", mininterval=1.0):
            scores = clf.scores(doc.text)
            if args.mode == "quality":
                doc.metadata[args.key] = round(scores.get(args.positive_label, 0.0), 5)
            else:
                doc.metadata["domain"] = max(scores, key=scores.get)
                doc.metadata["domain_scores"] = {k: round(v, 5) for k, v in scores.items()}
            yield {"text": doc.text, "id": doc.id, "metadata": doc.metadata}

    problems: dict[str, int] = {}
    threshold = args.threshold
    all_scores: list[float] = []
    if args.mode == "quality" and (args.keep_top is not None or args.plot):
        # first pass: scores only (documents are not held in memory), to find the top-fraction cut
        all_scores = [rec["metadata"][args.key] for rec in scored()]
        if args.keep_top is not None and all_scores:
            threshold = top_fraction_threshold(all_scores, args.keep_top)
        problems.clear()
    n_in = 0

    def kept() -> Iterator[dict[str, Any]]:
        nonlocal n_in
        for rec in scored():
            n_in += 1
            if threshold is None or args.mode != "quality" or rec["metadata"][args.key] >= threshold:
                yield rec

    n_out = _write_jsonl(args.output, kept())
    cut = f" (score >= {threshold:.4f})" if threshold is not None and args.mode == "quality" else ""
    print(f"scored {n_in} documents, kept {n_out}{cut} -> {args.output}")
    if problems:
        print("input problems (counted, not scored): " + ", ".join(f"{k}={v}" for k, v in sorted(problems.items())))
    if args.plot and all_scores:
        from herd.data.report import plot_score_histogram

        plot_score_histogram(all_scores, args.plot, title=f"{args.key} ({len(all_scores)} documents)",
                             threshold=threshold)
        print(f"wrote {args.plot}")
    return 0


def add_fit_kl_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, help="files/folders of a corpus sample")
    parser.add_argument("--output", required=True, help="where to write the distribution JSON (KLConfig.distribution)")
    parser.add_argument("--max-docs", type=int, default=100000, help="documents of the sample to read")
    parser.add_argument("--vocab-size", type=int, default=50000, help="most frequent tokens kept; the rest share one bucket")
    parser.add_argument("--tokenizer", default="", help="herd tokenizer file to count token ids (default: lowercase words)")
    parser.add_argument("--text-key", default="text", help="field holding the text in jsonl/parquet input")
    parser.add_argument("--format", default="auto", choices=["auto", "jsonl", "parquet", "text"], help="input format")


def run_fit_kl(args: argparse.Namespace) -> int:
    from itertools import islice

    from herd.data.filters.kl import fit_token_distribution

    docs = iter_documents(args.input, format=args.format, text_key=args.text_key)
    texts = [d.text for d in tqdm(islice(docs, args.max_docs), desc="reading sample", unit="doc", mininterval=1.0)]
    dist = fit_token_distribution(texts, vocab_size=args.vocab_size, tokenizer_path=args.tokenizer)
    dist.save(args.output)
    q = dist.kl_quantiles
    print(f"fitted on {len(texts)} documents, {len(dist.counts)} tokens kept -> {args.output}")
    print(f"KL (nats) median {q[500]:.3f}, 99th percentile {q[990]:.3f}, max {q[-1]:.3f}")
    return 0
