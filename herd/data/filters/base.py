"""HerdFilter: datatrove's BaseFilter plus character accounting, the base of herd's filters.

datatrove's BaseFilter counts documents kept and dropped (and `dropped_<reason>`), but records
characters only for kept documents. The data report must show characters in, kept and dropped
per reason, so herd's filters add these stats (all are datatrove MetricStats, merged across
tasks by the executor like any other stat):

    chars_in                  characters of every document the filter saw
    chars_dropped             characters of dropped documents
    chars_dropped_<reason>    the same, per drop reason

Everything else (exclusion writers, `filter_reason` metadata on excluded documents, stats
files) is datatrove's, so herd filters run unchanged on Local, Slurm and Ray executors.
"""

from __future__ import annotations

import contextlib

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.filters.base_filter import BaseFilter, get_filter_result
from datatrove.utils.typeshelper import StatHints


class HerdFilter(BaseFilter):
    """A BaseFilter that also counts characters in / dropped (per reason). Subclasses implement `filter`."""

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        writer_ctx = self.exclusion_writer if self.exclusion_writer else contextlib.nullcontext()
        with writer_ctx as writer:
            for doc in data:
                n_chars = len(doc.text)
                with self.track_time():
                    keep, reason = get_filter_result(self.filter(doc))
                self.stat_update(StatHints.total)
                self.stat_update("chars_in", value=n_chars)
                if keep:
                    self.stat_update(StatHints.forwarded)
                    self.update_doc_stats(doc)
                    yield doc
                    continue
                self.stat_update(StatHints.dropped)
                self.stat_update("chars_dropped", value=n_chars)
                if reason:
                    self.stat_update(f"dropped_{reason}")
                    self.stat_update(f"chars_dropped_{reason}", value=n_chars)
                    doc.metadata["filter_reason"] = reason
                if writer is not None:
                    writer.write(doc, rank)
