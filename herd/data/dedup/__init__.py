"""Dedup, Llama 3's three levels: URL (keep the most recent), document MinHash LSH, frequent lines.

url.py, minhash.py and lines.py hold the algorithms as plain functions on numpy arrays;
stages.py runs them as datatrove pipeline steps (signatures per task -> one global plan ->
apply per task).
"""

from herd.data.dedup.lines import document_line_hashes, frequent_lines, normalize_line, remove_lines
from herd.data.dedup.minhash import band_hashes, cluster_duplicates, document_bands, hash_functions, shingle_hashes, signature
from herd.data.dedup.url import normalize_url, parse_date, url_duplicates, url_key

__all__ = ["normalize_url", "url_key", "parse_date", "url_duplicates", "shingle_hashes", "signature", "band_hashes",
           "document_bands", "hash_functions", "cluster_duplicates", "normalize_line", "document_line_hashes",
           "frequent_lines", "remove_lines"]
