"""Where fastconv's compiled kernels are cached, and when that cache is stale.

Numba's own cache keys each function on the hash of its own source file, so a kernel cached in one module keeps
the machine code of the functions it calls from another module even after those change: stale code, or a
crash when their signatures moved. Its in-tree cache also fails with "no locator available" where the
package directory is read-only and no user cache directory is writable.

This locator, installed before any kernel is defined, keys every fastconv kernel on one hash of all the
package's source files, and stores them in a folder named after that hash: the first writable of the
package's ``__pycache__``, ``$NUMBA_CACHE_DIR/fastconv``, the user cache directory, or a private temporary
folder. An edit or an upgrade changes the hash, so old machine code is never served; folders of other hashes
in the same place are removed.
"""

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from numba.core import caching

PACKAGE_DIR = Path(__file__).resolve().parent


def _source_stamp():
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:20]


SOURCE_STAMP = _source_stamp()


def _candidate_roots():
    yield PACKAGE_DIR / "__pycache__"
    if os.environ.get("NUMBA_CACHE_DIR"):
        yield Path(os.environ["NUMBA_CACHE_DIR"]) / "fastconv"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    yield Path(xdg) / "fastconv"


def _writable(folder):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


def _prune_other_stamps(root):
    """Remove the kernel folders that earlier sources left next to the current one (best effort)."""
    for old in root.glob("kernels-*"):
        if old.name != f"kernels-{SOURCE_STAMP}":
            shutil.rmtree(old, ignore_errors=True)


def _choose_cache_dir():
    for root in _candidate_roots():
        folder = root / f"kernels-{SOURCE_STAMP}"
        if _writable(folder):
            _prune_other_stamps(root)
            return folder
    # Nothing writable: cache for this process only, rather than fail at import.
    return Path(tempfile.mkdtemp(prefix="fastconv-kernels-"))


_cache_dir = None


def cache_dir():
    """The folder holding this version's compiled kernels (chosen on first use)."""
    global _cache_dir
    if _cache_dir is None:
        _cache_dir = _choose_cache_dir()
    return _cache_dir


class PackageCacheLocator(caching._CacheLocator):
    """Numba cache locator for the functions defined in fastconv's own modules."""

    def __init__(self, py_func, py_file):
        self._lineno = py_func.__code__.co_firstlineno

    def ensure_cache_path(self):
        cache_dir().mkdir(parents=True, exist_ok=True)

    def get_cache_path(self):
        return str(cache_dir())

    def get_source_stamp(self):
        return SOURCE_STAMP

    def get_disambiguator(self):
        return str(self._lineno)

    @classmethod
    def from_function(cls, py_func, py_file):
        if Path(py_file).resolve().parent != PACKAGE_DIR:
            return None
        return cls(py_func, py_file)


def install():
    """Put the locator first in Numba's list, once; fastconv's kernels are defined after this."""
    locators = caching.CacheImpl._locator_classes
    if PackageCacheLocator not in locators:
        locators.insert(0, PackageCacheLocator)
