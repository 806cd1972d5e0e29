"""Reading published outputs back for comparisons between runs."""

from __future__ import annotations

import os

import faiss
import numpy as np
import pandas as pd


def recommendations(out: str) -> pd.DataFrame:
    frame = pd.read_parquet(os.path.join(out, "recommendations"))
    return frame.sort_values(["query_idx", "rank"]).reset_index(drop=True)


def index_contents(out: str) -> list[tuple[list[int], bytes]]:
    """Per inverted list: its ids and codes, in id order (independent of shard order)."""
    index = faiss.read_index(os.path.join(out, "index", "items.faiss"))
    invlists = faiss.extract_index_ivf(index).invlists
    contents = []
    for lst in range(invlists.nlist):
        n = invlists.list_size(lst)
        ids = faiss.rev_swig_ptr(invlists.get_ids(lst), n).copy()
        codes = faiss.rev_swig_ptr(invlists.get_codes(lst), n * invlists.code_size).copy()
        order = np.argsort(ids)
        contents.append((ids[order].tolist(), codes.reshape(n, -1)[order].tobytes()))
    return contents
