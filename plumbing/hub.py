"""One answer to "can we get this from the Hugging Face hub?", for models and rewards alike.

These machines (and many clusters) have no internet: a hub lookup there can hang for tens of
seconds, so every loader first asks here whether the files are cached or the hub is reachable, and
otherwise fails at once with one line that names the model and the fix.
"""
import os
import socket
from urllib.parse import urlparse


def offline():
    """HF_HUB_OFFLINE is set: never try the network."""
    return os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")


def reachable(host=None):
    """Can we download from `host` (default: the hub's, which HF_ENDPOINT may point at a mirror)?
    Asked only when the files are not cached. Without DNS, the hub client retries for ~25 s before
    failing; a 3 s connection attempt answers at once."""
    if host is None:
        from huggingface_hub import constants
        host = urlparse(constants.ENDPOINT).hostname
    if offline():
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct connection says nothing; let the download try
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def cached(repo, *filenames, revision=None):
    """Is any of `filenames` of hub repo `repo` (at `revision`: a branch, tag or commit; None = main)
    in the local cache?"""
    from huggingface_hub import try_to_load_from_cache
    return any(isinstance(try_to_load_from_cache(repo, f, revision=revision), str) for f in filenames)


def snapshot(repo, revision=None):
    """The local snapshot folder of hub `repo` (at `revision`; None = main) if it is cached, else None."""
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo, revision=revision, local_files_only=True)
    except Exception:
        return None
