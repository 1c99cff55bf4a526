"""Shard URL lists: brace ranges and `::` lists (webdataset's expansion) plus local globs and folders."""

from __future__ import annotations

import glob
import os

from webdataset.shardlists import expand_urls as _wds_expand

from plait.data.remote import is_pipe, is_url


def is_remote(url: str) -> bool:
    """True for `pipe:` commands and URLs with a scheme (read through `plait.data.remote`), not local paths."""
    return is_pipe(url) or is_url(url)


def expand_urls(spec: str) -> list[str]:
    """Expand a shard spec into URLs: folder → its `*.tar`, globs and brace ranges → sorted matches."""
    urls: list[str] = []
    for url in _wds_expand(spec):
        if is_remote(url):
            urls.append(url)
        elif os.path.isdir(url):
            urls.extend(sorted(glob.glob(os.path.join(url, "*.tar"))))
        elif glob.has_magic(url):
            urls.extend(sorted(glob.glob(url)))
        else:
            urls.append(url)
    return urls
