"""Where a run reads and writes: a local path or a `gs://bucket/...` URL, one Path type for both.

The seam is `etils.epath`: Orbax already takes its paths, it maps a local path to the `os`
module (so local runs behave exactly as with `pathlib`) and `gs://` to gcsfs (fsspec), and
the few things an object store does differently (no rename, no append, listing by prefix)
are here, in one place.
"""

from storage.appendable import AppendableFile
from storage.paths import (
    Path,
    files_under,
    is_remote,
    objects_under,
    path,
    write_atomically,
)
from storage.transfer import local_copy, written_to

__all__ = ["AppendableFile", "Path", "files_under", "is_remote", "local_copy", "objects_under",
           "path", "write_atomically", "written_to"]
