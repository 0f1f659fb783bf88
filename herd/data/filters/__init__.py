"""herd's document filters and annotators: language id, Gopher repetition, dirty words, token KL, model quality.

Each is a datatrove filter (HerdFilter) or annotator with a flat dataclass config; see each module.
"""
