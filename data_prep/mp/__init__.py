"""Materials Project acquisition: selection, DOS + structure + oxidation-state download, canonical records.

``python -m data_prep fetch --source mp --out DIR`` (``fetch.fetch_mp``) writes one record per
material into DIR, resumably and optionally sharded; ``python -m data_prep merge OUT IN...``
(``merge.merge_folders``) combines folders. ``api`` holds everything that talks to mp-api.
"""
from data_prep.mp.api import AuthError, FetchError
from data_prep.mp.fetch import FetchConfig, fetch_mp, format_summary, parse_shard, plan, shard_index
from data_prep.mp.merge import MergeError, merge_folders, record_difference

__all__ = ["AuthError", "FetchConfig", "FetchError", "MergeError", "fetch_mp", "format_summary",
           "merge_folders", "parse_shard", "plan", "record_difference", "shard_index"]
